"""piaa_triton.repository and .config: the typed description, both profiles, the files written."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from tritonclient.grpc import model_config_pb2 as pb

from piaa_client import features as fs
from piaa_export import onnx2trt
from piaa_triton.config import DataType, ModelConfig, Tensor, parse
from piaa_triton.exceptions import RepositoryError
from piaa_triton.repository import (
    BACKBONE_ENSEMBLE,
    CPU_BATCHING,
    DEFAULT_CPU_LAYOUT,
    ENSEMBLE,
    GPU_BATCHING,
    LAYOUT_ENV,
    cpu_plan,
    describe,
    write_repository,
)

IMAGE_DIMS = [3, fs.IMAGE_SIZE, fs.IMAGE_SIZE]


def stand_in_heads(path: Path, space: str = fs.FEATURE_SPACE_VERSION, doc: str = "stand-in heads") -> Path:
    """A minimal ONNX file carrying the heads' feature-space metadata (the renderer reads only that)."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["feature"], ["generic"])],
        "heads",
        [onnx.helper.make_tensor_value_info("feature", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("generic", onnx.TensorProto.FLOAT, [1])],
    )
    model = onnx.helper.make_model(graph, doc_string=doc)
    onnx.helper.set_model_props(model, {"feature_space_version": space})
    onnx.save(model, str(path))
    return path


def fake_onnx(tmp_path: Path) -> Path:
    folder = tmp_path / "onnx"
    folder.mkdir()
    for name in ("backbone", "backbone.int8.cpu"):
        (folder / f"{name}.onnx").write_bytes(f"stand-in {name}".encode())
    stand_in_heads(folder / "heads.onnx")
    return folder


def read_repository(root: Path) -> dict[str, pb.ModelConfig]:
    return {p.parent.name: parse(p.read_text()) for p in sorted(root.glob("*/config.pbtxt"))}


def test_config_needs_exactly_one_of_backend_or_platform() -> None:
    tensor = Tensor("x", DataType.FP32, (1,))
    with pytest.raises(ValueError, match="exactly one"):
        ModelConfig(name="m", max_batch_size=1, inputs=(tensor,), outputs=(tensor,))
    with pytest.raises(ValueError, match="exactly one"):
        ModelConfig("m", 1, (tensor,), (tensor,), backend="python", platform="tensorrt_plan")
    with pytest.raises(ValueError, match="ensemble"):
        ModelConfig("m", 1, (tensor,), (tensor,), platform="ensemble")


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_pbtxt_round_trips_through_tritons_proto(profile: str) -> None:
    for model in describe(profile, cores=2):
        text = model.to_pbtxt()
        assert text.startswith("# Generated")
        assert parse(text) == model.to_proto()


@pytest.mark.parametrize("cores", [1, 2, 4, 8, 16, 64])
def test_cpu_plan_never_oversubscribes_the_backbone(cores: int) -> None:
    plan = cpu_plan(cores)
    assert plan.backbone_instances * plan.backbone_intra_op_threads <= cores
    assert plan.decode_threads <= max(1, cores // 2)
    assert plan.heads_intra_op_threads == 1 and plan.preprocess_instances >= 1
    assert plan.fused_instances * plan.fused_intra_op_threads <= cores
    assert plan.fused_decode_threads <= max(1, plan.fused_intra_op_threads // 2)
    assert plan.fused_instances == (2 if cores > 1 else 1)  # one decodes while the other infers


@pytest.mark.parametrize(
    ("profile", "layout"), [("cpu", "fused"), ("cpu", "fused_heads"), ("cpu", "split"), ("gpu", None)]
)
def test_ensemble_graph_is_consistent(profile: str, layout: str | None) -> None:
    """Every step reads tensors produced earlier, with the names and dims its model declares."""
    models = {m.name: m.to_proto() for m in describe(profile, cores=2, layout=layout)}
    ensemble = models[ENSEMBLE]
    assert [t.name for t in ensemble.input] == [fs.ENSEMBLE_INPUT.name]
    assert ensemble.input[0].data_type == pb.TYPE_STRING and list(ensemble.input[0].dims) == [1]
    assert [(t.name, list(t.dims)) for t in ensemble.output] == [
        (o.name, list(o.dims)) for o in fs.HEAD_OUTPUTS
    ]
    shapes = {t.name: (t.data_type, list(t.dims)) for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = models[step.model_name]
        assert model.max_batch_size >= ensemble.max_batch_size
        declared_in = {t.name: (t.data_type, list(t.dims)) for t in model.input}
        for own, outer in step.input_map.items():
            assert shapes[outer] == declared_in[own], f"{step.model_name}.{own}"
        declared_out = {t.name: (t.data_type, list(t.dims)) for t in model.output}
        for own, outer in step.output_map.items():
            shapes[outer] = declared_out[own]
    for tensor in ensemble.output:
        assert shapes[tensor.name] == (tensor.data_type, list(tensor.dims))
    if layout in ("fused", "fused_heads"):  # no pixels between models: the backbone decodes the bytes
        assert "preprocessed" not in shapes
        # fused_heads: one step, the backbone runs the heads too
        steps = ["backbone"] if layout == "fused_heads" else ["backbone", "heads"]
        assert [s.model_name for s in ensemble.ensemble_scheduling.step] == steps
        assert [s.model_name for s in models[BACKBONE_ENSEMBLE].ensemble_scheduling.step] == ["backbone"]
        return
    # The pixels between preprocess and backbone are uint8 (features.BACKBONE_INPUT.dtype), in both profiles.
    assert shapes["preprocessed"] == (pb.TYPE_UINT8, list(fs.BACKBONE_INPUT.dims))


@pytest.mark.parametrize("layout", ["fused", "split", "fused_heads"])
def test_cpu_repository_is_written_idempotently(tmp_path: Path, layout: str) -> None:
    out = tmp_path / "cpu"
    onnx = fake_onnx(tmp_path)
    changed = write_repository("cpu", out, onnx, cores=2, layout=layout)
    preprocess = {"preprocess/config.pbtxt", "preprocess/1/model.py"} if layout == "split" else set()
    fused_heads = {"backbone/1/heads.onnx"} if layout == "fused_heads" else set()
    assert {p.relative_to(out).as_posix() for p in changed} == preprocess | fused_heads | {
        "backbone/config.pbtxt",
        "backbone/1/model.py",
        "backbone/1/model.onnx",
        "heads/config.pbtxt",
        "heads/1/model.py",
        "heads/1/model.onnx",
        "piaa/config.pbtxt",
        "piaa_backbone/config.pbtxt",
    }
    assert (out / "piaa" / "1").is_dir()
    assert write_repository("cpu", out, onnx, cores=2, layout=layout) == []
    stand_in_heads(onnx / "heads.onnx", doc="re-exported")  # a new export is copied in, nothing else changes
    copies = [out / "heads" / "1" / "model.onnx", *(out / p for p in fused_heads)]
    assert sorted(write_repository("cpu", out, onnx, cores=2, layout=layout)) == sorted(copies)
    assert all(p.read_bytes() == (onnx / "heads.onnx").read_bytes() for p in copies)
    model = "OnnxModel" if layout == "split" else "DecodeBackboneModel"
    assert model in (out / "backbone" / "1" / "model.py").read_text()


def test_switching_the_layout_rewrites_the_backbone_and_drops_preprocess(tmp_path: Path) -> None:
    out, onnx = tmp_path / "cpu", fake_onnx(tmp_path)
    write_repository("cpu", out, onnx, cores=2, layout="split")
    changed = write_repository("cpu", out, onnx, cores=2, layout="fused")
    assert {p.relative_to(out).as_posix() for p in changed} == {
        "preprocess",
        "backbone/config.pbtxt",
        "backbone/1/model.py",
        "piaa/config.pbtxt",
        "piaa_backbone/config.pbtxt",
    }
    assert not (out / "preprocess").exists()


def test_switching_to_fused_heads_and_back_adds_and_removes_the_backbones_heads(tmp_path: Path) -> None:
    out, onnx = tmp_path / "cpu", fake_onnx(tmp_path)
    write_repository("cpu", out, onnx, cores=2, layout="fused")
    both_ways = {"backbone/config.pbtxt", "backbone/1/heads.onnx", "piaa/config.pbtxt"}
    changed = write_repository("cpu", out, onnx, cores=2, layout="fused_heads")
    assert {p.relative_to(out).as_posix() for p in changed} == both_ways
    changed = write_repository("cpu", out, onnx, cores=2, layout="fused")
    assert {p.relative_to(out).as_posix() for p in changed} == both_ways
    assert not (out / "backbone" / "1" / "heads.onnx").exists()


def test_the_layout_comes_from_the_argument_else_the_environment_else_fused_heads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(LAYOUT_ENV, raising=False)
    assert DEFAULT_CPU_LAYOUT == "fused_heads"
    models = {m.name: m for m in describe("cpu", cores=2)}
    assert set(models) == {"backbone", "heads", ENSEMBLE, BACKBONE_ENSEMBLE}
    assert [step.model_name for step in models[ENSEMBLE].ensemble_steps] == ["backbone"]
    assert models[ENSEMBLE].parameters["heads_model"] == "heads"  # what the gateway re-scores with
    monkeypatch.setenv(LAYOUT_ENV, "split")
    assert "preprocess" in {m.name for m in describe("cpu", cores=2)}
    assert "preprocess" not in {m.name for m in describe("cpu", cores=2, layout="fused")}
    monkeypatch.setenv(LAYOUT_ENV, "merged")
    with pytest.raises(RepositoryError, match="unknown cpu layout 'merged'"):
        write_repository("cpu", tmp_path / "cpu", fake_onnx(tmp_path), cores=2)


@pytest.mark.parametrize("layout", ["fused", "split", "fused_heads"])
def test_the_served_feature_space_comes_from_the_heads_metadata(tmp_path: Path, layout: str) -> None:
    onnx_dir = fake_onnx(tmp_path)
    stand_in_heads(onnx_dir / "heads.onnx", space="fs7")
    extra = stand_in_heads(tmp_path / "heads_fs8.onnx", space="fs8")
    write_repository("cpu", tmp_path / "cpu", onnx_dir, cores=2, extra_heads=[extra], layout=layout)
    models = read_repository(tmp_path / "cpu")
    to_feature = ["preprocess", "backbone"] if layout == "split" else ["backbone"]
    assert set(models) == {
        *to_feature, "heads", ENSEMBLE, BACKBONE_ENSEMBLE, "heads_fs8", f"{ENSEMBLE}_fs8"
    }  # fmt: skip
    space = {name: m.parameters["feature_space_version"].string_value for name, m in models.items()}
    assert space == {**dict.fromkeys(to_feature, ""), "heads": "fs7", ENSEMBLE: "fs7", BACKBONE_ENSEMBLE: "",
                     "heads_fs8": "fs8", f"{ENSEMBLE}_fs8": "fs8"}  # fmt: skip
    named = {
        name: m.parameters["heads_model"].string_value
        for name, m in models.items()
        if "heads_model" in m.parameters
    }
    assert named == {
        ENSEMBLE: "heads",
        f"{ENSEMBLE}_fs8": "heads_fs8",
    }  # the heads the gateway re-scores with
    # Side by side: the second ensemble shares the steps to the feature and runs its own heads.
    steps = [s.model_name for s in models[f"{ENSEMBLE}_fs8"].ensemble_scheduling.step]
    assert steps == [*to_feature, "heads_fs8"]
    assert models[f"{ENSEMBLE}_fs8"].input == models[ENSEMBLE].input
    assert models[f"{ENSEMBLE}_fs8"].output == models[ENSEMBLE].output
    assert [t.name for t in models[BACKBONE_ENSEMBLE].output] == ["feature"]  # kept for rated images
    assert [s.model_name for s in models[BACKBONE_ENSEMBLE].ensemble_scheduling.step] == to_feature
    assert (tmp_path / "cpu" / "heads_fs8" / "1" / "model.onnx").read_bytes() == extra.read_bytes()
    assert models["heads_fs8"].backend == models["heads"].backend == "python"


def test_heads_without_a_feature_space_or_twice_the_same_are_refused(tmp_path: Path) -> None:
    onnx_dir = fake_onnx(tmp_path)
    same = stand_in_heads(tmp_path / "same.onnx")
    with pytest.raises(RepositoryError, match="served already"):
        write_repository("cpu", tmp_path / "cpu", onnx_dir, cores=2, extra_heads=[same])
    stand_in_heads(onnx_dir / "heads.onnx", space="")
    with pytest.raises(RepositoryError, match="no usable feature space"):
        write_repository("cpu", tmp_path / "cpu", onnx_dir, cores=2)


def test_stale_generated_models_are_removed_but_foreign_folders_kept(tmp_path: Path) -> None:
    out = tmp_path / "cpu"
    onnx = fake_onnx(tmp_path)
    write_repository("cpu", out, onnx, cores=2)
    (out / "old").mkdir()
    (out / "old" / "config.pbtxt").write_text("# Generated by an older version\n")
    (out / "mine").mkdir()
    (out / "mine" / "config.pbtxt").write_text('name: "mine"\n')
    write_repository("cpu", out, onnx, cores=2)
    assert not (out / "old").exists() and (out / "mine").exists()


def test_cpu_repository_needs_the_onnx_files(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match=r"heads\.onnx.*piaa_export"):
        (tmp_path / "onnx").mkdir()
        (tmp_path / "onnx" / "backbone.onnx").write_bytes(b"x")
        write_repository("cpu", tmp_path / "cpu", tmp_path / "onnx")


@pytest.mark.parametrize("layout", ["fused", "split", "fused_heads"])
def test_cpu_profile_structure(tmp_path: Path, layout: str) -> None:
    write_repository("cpu", tmp_path / "cpu", fake_onnx(tmp_path), cores=2, layout=layout)
    models = read_repository(tmp_path / "cpu")
    python_models = ("preprocess", "backbone", "heads") if layout == "split" else ("backbone", "heads")
    assert set(models) == {*python_models, ENSEMBLE, BACKBONE_ENSEMBLE}
    for name in python_models:
        model = models[name]
        assert model.backend == "python" and not model.platform
        assert [g.kind for g in model.instance_group] == [pb.ModelInstanceGroup.KIND_CPU]
        assert model.max_batch_size == CPU_BATCHING.max_batch_size
        policy = model.dynamic_batching.default_queue_policy
        assert policy.timeout_action == pb.ModelQueuePolicy.REJECT
        assert policy.max_queue_size > 0 and policy.default_timeout_microseconds > 0
    assert models["heads"].parameters["intra_op_threads"].string_value == "1"
    backbone = models["backbone"]
    own = [("feature", [1280]), ("logits", [1000])]
    heads = [(o.name, list(o.dims)) for o in fs.HEAD_OUTPUTS] if layout == "fused_heads" else []
    assert [(t.name, list(t.dims)) for t in backbone.output] == own + heads
    assert backbone.parameters["precision"].string_value == "int8"
    if layout != "fused_heads":
        assert "heads_onnx_file" not in backbone.parameters
    if layout == "split":
        assert backbone.parameters["intra_op_threads"].string_value == "2"
        assert models["preprocess"].parameters["decode_threads"].string_value == "1"
        assert [t.name for t in backbone.input] == ["image"]
        return
    # Two instances with a core each: one decodes while the other runs ONNX Runtime.
    assert [t.name for t in backbone.input] == [fs.ENSEMBLE_INPUT.name]
    assert backbone.input[0].data_type == pb.TYPE_STRING
    assert [g.count for g in backbone.instance_group] == [2]
    assert backbone.parameters["intra_op_threads"].string_value == "1"
    assert backbone.parameters["decode_threads"].string_value == "1"
    if layout == "fused":
        return
    # The heads in the backbone's stub: the heads model's file and thread count.
    assert backbone.parameters["heads_onnx_file"].string_value == "heads.onnx"
    assert backbone.parameters["heads_intra_op_threads"].string_value == "1"
    folder = tmp_path / "cpu" / "backbone" / "1"
    assert (folder / "heads.onnx").read_bytes() == (
        tmp_path / "cpu" / "heads" / "1" / "model.onnx"
    ).read_bytes()


def test_gpu_profile_structure(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    write_repository("gpu", out)
    models = read_repository(out)
    assert set(models) == {"preprocess", "backbone", "heads", ENSEMBLE, BACKBONE_ENSEMBLE}
    assert models[ENSEMBLE].platform == "ensemble"
    assert not models[ENSEMBLE].HasField("dynamic_batching")
    for name in ("backbone", "heads"):
        model = models[name]
        assert model.platform == "tensorrt_plan" and not model.backend
        note = (out / name / "1" / "BUILD.md").read_text()
        assert f"piaa_export.cli engines /opt/piaa/onnx/{name}.onnx" in note
        assert f"1..{GPU_BATCHING.max_batch_size}" in note and "--max-batch-size" not in note
        config = parse((out / name / "config.pbtxt").read_text())
        assert config.parameters["precision"].string_value in ("fp16", "int8")
        # One plan per GPU kind, named as the exporter's engine builder names them; model.plan otherwise.
        assert dict(model.cc_model_filenames) == {
            "7.5": "model_sm75.plan",
            "8.0": "model_sm80.plan",
            "8.6": "model_sm86.plan",
            "8.9": "model_sm89.plan",
            "9.0": "model_sm90.plan",
        }
        assert all(onnx2trt.plan_filename(cc) == f for cc, f in model.cc_model_filenames.items())
        assert model.default_model_filename == "model.plan"
    assert models["preprocess"].backend == "python"
    assert models["preprocess"].parameters["decoder"].string_value == "dali_nvjpeg"
    assert "GpuPreprocessModel" in (out / "preprocess" / "1" / "model.py").read_text()
    backbone = models["backbone"]
    assert [(t.name, list(t.dims)) for t in backbone.input] == [("image", IMAGE_DIMS)]
    assert [(t.name, list(t.dims)) for t in backbone.output] == [("feature", [1280]), ("logits", [1000])]
    assert [(t.name, list(t.dims)) for t in models["heads"].output] == [
        (o.name, list(o.dims)) for o in fs.HEAD_OUTPUTS
    ]
    for name in ("preprocess", "backbone", "heads"):
        model = models[name]
        assert [g.kind for g in model.instance_group] == [pb.ModelInstanceGroup.KIND_GPU]
        assert model.max_batch_size == GPU_BATCHING.max_batch_size
        assert model.dynamic_batching.max_queue_delay_microseconds == GPU_BATCHING.max_queue_delay_us
        assert model.dynamic_batching.default_queue_policy.max_queue_size == GPU_BATCHING.max_queue_size


def test_unknown_profile_is_refused() -> None:
    with pytest.raises(RepositoryError, match="unknown profile"):
        describe("tpu")
