"""deploy/triton/launch.py: which engines it builds and when it skips, the cores it plans for, the
tritonserver command, and the repositories it writes (no GPU, no TensorRT, no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import onnx
import pytest

from piaa_client.features import FEATURE_SPACE_VERSION
from piaa_export.cli import parser as exporter_parser
from piaa_export.sources import file_sha256
from piaa_triton.config import PYTHON_SHM_DEFAULT_BYTES, parse
from piaa_triton.paths import BACKBONE_INT8_CPU_ONNX, BACKBONE_INT8_ONNX, plan_filename
from piaa_triton.repository import ENSEMBLE, GPU_BATCHING, GPU_PRECISION, PRECISION_ENV, write_repository
from tests.deploy_scripts import load_launch

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


launch = load_launch()


@pytest.fixture
def onnx_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "onnx"
    folder.mkdir()
    (folder / "backbone.onnx").write_bytes(b"stand-in backbone")
    # The repository reads the served feature space from the heads file's metadata: a real (tiny) ONNX.
    heads = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            "stand-in heads",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
    )
    onnx.helper.set_model_props(heads, {"feature_space_version": FEATURE_SPACE_VERSION})
    onnx.save(heads, folder / "heads.onnx")
    return folder


@pytest.fixture
def gpu_repository(tmp_path: Path) -> Path:
    out = tmp_path / "models"
    write_repository("gpu", out)
    return out


def fake_build(job: Any, cc: str, trt: str, precision: str = "fp16", batch: int | None = None) -> None:
    """What the exporter leaves behind: model_sm<cc>.plan and its build JSON."""
    plan = job.version_dir / plan_filename(cc)
    plan.write_bytes(b"engine")
    info = {
        "tensorrt": trt,
        "compute_capability": cc,
        "onnx_sha256": file_sha256(job.onnx),
        "config": {"precision": precision, "max_batch_size": batch or job.max_batch_size},
        "source_checks": {"int8_onnx_sha256": file_sha256(job.int8_onnx)} if job.int8_onnx else {},
    }
    plan.with_suffix(".json").write_text(json.dumps(info))


def test_one_engine_per_tensorrt_model_with_the_repositorys_batch_size_and_precision(
    gpu_repository: Path, onnx_dir: Path
) -> None:
    jobs = launch.engine_jobs(gpu_repository, onnx_dir)
    assert [j.name for j in jobs] == ["backbone", "heads"]
    for job in jobs:
        assert job.max_batch_size == GPU_BATCHING.max_batch_size
        assert job.precision == GPU_PRECISION[job.name]
        assert parse((job.model_dir / "config.pbtxt").read_text()).platform == "tensorrt_plan"
        command = job.command(Path("/photos"))
        assert command[1:4] == ["-m", "piaa_export.cli", "engines"]
        args = exporter_parser().parse_args(command[3:])  # the exporter's own flags accept it
        assert (args.onnx, args.model_dir) == (onnx_dir / f"{job.name}.onnx", job.model_dir)
        assert args.parity_photos == Path("/photos") and args.int8_onnx is None
        assert not {"--max-batch-size", "--precision"} & set(command), "both come from config.pbtxt"


def test_an_int8_backbone_builds_from_the_qdq_model(tmp_path: Path, onnx_dir: Path) -> None:
    out = tmp_path / "models"
    write_repository("gpu", out)
    config = out / "backbone" / "config.pbtxt"
    config.write_text(config.read_text().replace('string_value: "fp16"', 'string_value: "int8"'))
    with pytest.raises(FileNotFoundError, match=BACKBONE_INT8_ONNX.replace(".", r"\.")):
        launch.engine_jobs(out, onnx_dir)
    (onnx_dir / BACKBONE_INT8_ONNX).write_bytes(b"stand-in qdq")
    job = launch.engine_jobs(out, onnx_dir)[0]
    assert (job.precision, job.int8_onnx) == ("int8", onnx_dir / BACKBONE_INT8_ONNX)
    assert exporter_parser().parse_args(job.command()[3:]).int8_onnx == onnx_dir / BACKBONE_INT8_ONNX
    fake_build(job, "9.0", "11.4.0.106", precision="int8")
    assert launch.is_current(job, "9.0", "11.4.0.106")
    (onnx_dir / BACKBONE_INT8_ONNX).write_bytes(b"recalibrated")
    assert not launch.is_current(job, "9.0", "11.4.0.106")  # another Q/DQ model


def test_a_missing_onnx_model_is_an_error_not_a_skipped_engine(gpu_repository: Path, onnx_dir: Path) -> None:
    (onnx_dir / "heads.onnx").unlink()
    with pytest.raises(FileNotFoundError, match=r"heads\.onnx"):
        launch.engine_jobs(gpu_repository, onnx_dir)


def test_an_engine_is_current_only_for_the_same_gpu_tensorrt_onnx_and_batch(
    gpu_repository: Path, onnx_dir: Path
) -> None:
    job = launch.engine_jobs(gpu_repository, onnx_dir)[0]
    assert not launch.is_current(job, "9.0", "10.13.3.9")  # nothing built yet
    fake_build(job, "9.0", "10.13.3.9")
    assert launch.is_current(job, "9.0", "10.13.3.9")
    assert not launch.is_current(job, "8.6", "10.13.3.9")  # another GPU kind
    assert not launch.is_current(job, "9.0", "10.14.1.48")  # another TensorRT
    fake_build(job, "9.0", "10.13.3.9", precision="int8")
    assert not launch.is_current(job, "9.0", "10.13.3.9")  # another precision
    fake_build(job, "9.0", "10.13.3.9", batch=8)
    assert not launch.is_current(job, "9.0", "10.13.3.9")  # another batch size
    fake_build(job, "9.0", "10.13.3.9")
    job.onnx.write_bytes(b"a re-exported model")
    assert not launch.is_current(job, "9.0", "10.13.3.9")  # another ONNX


def test_the_served_model_plan_points_at_this_gpus_engine(gpu_repository: Path, onnx_dir: Path) -> None:
    job = launch.engine_jobs(gpu_repository, onnx_dir)[0]
    fake_build(job, "8.6", "10.13.3.9")
    fake_build(job, "9.0", "10.13.3.9")
    link = launch.link_default_plan(job, "9.0")
    assert link.name == "model.plan" and link.resolve().name == "model_sm90.plan"
    assert launch.link_default_plan(job, "8.6").resolve().name == "model_sm86.plan"  # re-pointed


@pytest.mark.parametrize(
    ("cpu_max", "expected"), [("400000 100000\n", 4), ("150000 100000\n", 2), ("50000 100000\n", 1)]
)
def test_cores_follow_the_cgroup_quota(tmp_path: Path, cpu_max: str, expected: int) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    assert launch.available_cores(path) == expected


def test_without_a_quota_all_cpus_count(tmp_path: Path) -> None:
    unlimited = tmp_path / "cpu.max"
    unlimited.write_text("max 100000\n")
    assert launch.available_cores(unlimited) == len(os.sched_getaffinity(0))
    assert launch.available_cores(tmp_path / "absent") == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_server_command(profile: str) -> None:
    command = launch.server_command(Path("/models"), profile)
    flags = dict(arg[2:].split("=", 1) for arg in command[1:])
    assert command[0] == "tritonserver" and flags["model-repository"] == "/models"
    assert flags["http-port"] == str(launch.HTTP_PORT)
    assert flags["grpc-port"] == str(launch.GRPC_PORT)
    assert flags["metrics-port"] == str(launch.METRICS_PORT)
    assert flags["strict-readiness"] == "true" and flags["model-control-mode"] == "none"
    assert flags["allow-gpu-metrics"] == ("true" if profile == "gpu" else "false")
    assert flags["backend-config"] == f"python,shm-default-byte-size={PYTHON_SHM_DEFAULT_BYTES}"
    for flag in ("grpc-restricted-protocol", "http-restricted-api"):
        apis, _, key = flags[flag].partition(":")
        assert {"shared-memory", "model-repository"} <= set(apis.split(","))
        assert key.startswith(f"{launch.ADMIN_HEADER}=") and len(key) > len(launch.ADMIN_HEADER) + 16
    assert command != launch.server_command(Path("/models"), profile), "the admin key is random per start"


def test_prepare_writes_the_cpu_repository_for_the_given_cores(
    tmp_path: Path, onnx_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launch, "ONNX_DIR", onnx_dir)
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    (onnx_dir / BACKBONE_INT8_CPU_ONNX).write_bytes(b"stand-in int8 backbone")
    out = tmp_path / "cpu"
    assert launch.main(["prepare", "--profile", "cpu", "--out", str(out), "--cores", "8"]) == 0
    backbone = parse((out / "backbone" / "config.pbtxt").read_text())
    assert backbone.parameters["intra_op_threads"].string_value == "8"
    assert (out / ENSEMBLE / "config.pbtxt").is_file()
    assert (out / "backbone" / "1" / "model.onnx").read_bytes() == b"stand-in int8 backbone"  # the default


def test_engines_only_go_with_the_gpu_profile(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        launch.main(["prepare", "--profile", "cpu", "--out", str(tmp_path), "--engines"])
    assert not any(tmp_path.iterdir())


def test_the_docs_state_the_ngc_versions_the_dockerfile_pins() -> None:
    """The NGC_* ARGs of triton.Dockerfile are the one place; the docs must say the same."""
    from tests.dockerfiles import arg_defaults

    ngc = arg_defaults(DEPLOY / "triton.Dockerfile")
    docs = (DEPLOY.parent / "docs" / "deployment.md").read_text()
    assert f"`NGC_TAG={ngc['NGC_TAG']}` (Triton {ngc['NGC_TRITON']})" in docs
    for key, label in [("NGC_TENSORRT", "TensorRT"), ("NGC_CUDA", "CUDA"), ("NGC_PYTHON", "Python")]:
        assert f"{label} {ngc[key]}" in docs, key
    assert f"glibc {ngc['NGC_GLIBC']}" in docs
