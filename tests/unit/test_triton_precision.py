"""The cpu profile's backbone precision: which file is served, what the config says, how it is chosen."""

from __future__ import annotations

from pathlib import Path

import pytest
from onnx import TensorProto, helper, save_model

from piaa_client.features import FEATURE_SPACE_VERSION
from piaa_triton.config import parse
from piaa_triton.exceptions import RepositoryError
from piaa_triton.paths import BACKBONE_INT8_CPU_ONNX
from piaa_triton.repository import (
    DEFAULT_CPU_PRECISION,
    PRECISION_ENV,
    cpu_precision,
    main,
    write_repository,
)


@pytest.fixture
def onnx(tmp_path: Path) -> Path:
    folder = tmp_path / "onnx"
    folder.mkdir()
    for name in ("backbone.onnx", BACKBONE_INT8_CPU_ONNX):
        (folder / name).write_bytes(f"stand-in {name}".encode())
    # The writer reads the heads' feature space from the file's metadata: a one-node model carries it.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "heads", [x], [x])
    graph.output[0].name = "y"
    model = helper.make_model(graph)
    helper.set_model_props(model, {"feature_space_version": FEATURE_SPACE_VERSION})
    save_model(model, str(folder / "heads.onnx"))
    return folder


def served(out: Path) -> tuple[bytes, str]:
    config = parse((out / "backbone" / "config.pbtxt").read_text())
    return (out / "backbone" / "1" / "model.onnx").read_bytes(), config.parameters["precision"].string_value


@pytest.mark.parametrize(("precision", "file"), [("fp32", "backbone.onnx"), ("int8", BACKBONE_INT8_CPU_ONNX)])
def test_each_precision_serves_its_file_and_names_it(
    tmp_path: Path, onnx: Path, precision: str, file: str
) -> None:
    write_repository("cpu", tmp_path / "cpu", onnx, cores=2, precision=precision)
    assert served(tmp_path / "cpu") == (f"stand-in {file}".encode(), precision)
    heads = (tmp_path / "cpu" / "heads" / "1" / "model.onnx").read_bytes()
    assert heads == (onnx / "heads.onnx").read_bytes()


def test_switching_precision_rewrites_only_the_backbone(tmp_path: Path, onnx: Path) -> None:
    out = tmp_path / "cpu"
    write_repository("cpu", out, onnx, cores=2, precision="fp32")
    changed = write_repository("cpu", out, onnx, cores=2, precision="int8")
    assert {p.relative_to(out).as_posix() for p in changed} == {
        "backbone/config.pbtxt",
        "backbone/1/model.onnx",
    }


def test_default_is_int8_and_the_environment_overrides_it(
    tmp_path: Path, onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    assert DEFAULT_CPU_PRECISION == "int8" == cpu_precision()
    write_repository("cpu", tmp_path / "a", onnx, cores=2)
    assert served(tmp_path / "a")[1] == "int8"
    monkeypatch.setenv(PRECISION_ENV, "fp32")
    write_repository("cpu", tmp_path / "b", onnx, cores=2)
    assert served(tmp_path / "b")[1] == "fp32"
    assert cpu_precision("int8") == "int8"  # an explicit argument beats the environment


def test_the_cli_flag_reaches_the_repository(tmp_path: Path, onnx: Path) -> None:
    out = tmp_path / "cpu"
    argv = ["--profile", "cpu", "--out", str(out), "--onnx-dir", str(onnx), "--cores", "2"]
    assert main([*argv, "--precision", "fp32"]) == 0
    assert served(out)[1] == "fp32"


def test_unknown_precision_is_refused(tmp_path: Path, onnx: Path) -> None:
    with pytest.raises(RepositoryError, match="fp16"):
        write_repository("cpu", tmp_path / "cpu", onnx, precision="fp16")
    with pytest.raises(SystemExit):
        main(["--profile", "cpu", "--precision", "fp16"])


def test_int8_without_its_file_says_to_quantize(tmp_path: Path, onnx: Path) -> None:
    (onnx / BACKBONE_INT8_CPU_ONNX).unlink()
    with pytest.raises(RepositoryError, match=r"backbone\.int8\.cpu\.onnx.*quantize"):
        write_repository("cpu", tmp_path / "cpu", onnx, precision="int8")
    write_repository("cpu", tmp_path / "cpu", onnx, precision="fp32")  # FP32 alone still serves
