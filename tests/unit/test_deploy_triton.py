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
from piaa_triton.repository import (
    ENSEMBLE,
    FEATURE_SPACE_PARAMETER,
    GPU_BATCHING,
    GPU_PRECISION,
    PRECISION_ENV,
    write_repository,
)
from tests.deploy_scripts import load_launch

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


launch = load_launch()


def stand_in_heads(path: Path, space: str) -> Path:
    """A real (tiny) ONNX file naming `space` in its metadata: what the repository reads the space from."""
    heads = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            f"stand-in heads {space}",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
    )
    onnx.helper.set_model_props(heads, {"feature_space_version": space})
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(heads, path)
    return path


@pytest.fixture
def onnx_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "onnx"
    folder.mkdir()
    (folder / "backbone.onnx").write_bytes(b"stand-in backbone")
    stand_in_heads(folder / "heads.onnx", FEATURE_SPACE_VERSION)
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
    threads = int(backbone.parameters["intra_op_threads"].string_value)
    assert sum(g.count for g in backbone.instance_group) * threads == 8
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


# --- a release's heads served side by side ---------------------------------------------------------------
def served_space(config: Path) -> str:
    return str(parse(config.read_text()).parameters[FEATURE_SPACE_PARAMETER].string_value)


def test_prepare_gpu_serves_a_release_the_image_carries_and_builds_its_engine(
    tmp_path: Path, onnx_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launch, "ONNX_DIR", onnx_dir)
    release = stand_in_heads(onnx_dir / "heads_fs2.onnx", "fs2")
    out = tmp_path / "models"
    assert (
        launch.main(["prepare", "--profile", "gpu", "--out", str(out)]) == 0
    )  # no flag: found in the folder
    assert served_space(out / "heads_fs2" / "config.pbtxt") == "fs2"
    pipeline = parse((out / f"{ENSEMBLE}_fs2" / "config.pbtxt").read_text())
    assert [step.model_name for step in pipeline.ensemble_scheduling.step][-1] == "heads_fs2"
    assert served_space(out / ENSEMBLE / "config.pbtxt") == FEATURE_SPACE_VERSION  # piaa is unchanged
    assert (
        "/opt/piaa/onnx/heads_fs2.onnx <repository>/heads_fs2"
        in (out / "heads_fs2" / "1" / "BUILD.md").read_text()
    )
    jobs = {job.name: job for job in launch.engine_jobs(out, onnx_dir, launch.extra_heads(onnx_dir))}
    assert sorted(jobs) == ["backbone", "heads", "heads_fs2"]
    job = jobs["heads_fs2"]
    assert (job.onnx, job.model_dir, job.precision) == (release, out / "heads_fs2", GPU_PRECISION["heads"])
    assert job.max_batch_size == GPU_BATCHING.max_batch_size
    args = exporter_parser().parse_args(job.command()[3:])
    assert (args.onnx, args.model_dir) == (release, out / "heads_fs2")


def test_extra_heads_from_elsewhere_build_from_their_own_file(tmp_path: Path, onnx_dir: Path) -> None:
    release = stand_in_heads(tmp_path / "release" / "new-heads.onnx", "fs3")
    out = tmp_path / "models"
    write_repository("gpu", out, onnx_dir, extra_heads=[release])
    heads = launch.extra_heads(onnx_dir, [release])
    assert heads == [release]
    assert {j.name: j.onnx for j in launch.engine_jobs(out, onnx_dir, heads)}["heads_fs3"] == release
    with pytest.raises(FileNotFoundError, match=r"heads_fs3\.onnx"):  # without it: no source, no engine
        launch.engine_jobs(out, onnx_dir)


def test_prepare_cpu_with_extra_heads_serves_that_file(
    tmp_path: Path, onnx_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launch, "ONNX_DIR", onnx_dir)
    monkeypatch.setenv(PRECISION_ENV, "fp32")
    release = stand_in_heads(tmp_path / "release" / "heads_fs2.onnx", "fs2")
    out = tmp_path / "cpu"
    argv = ["prepare", "--profile", "cpu", "--out", str(out), "--cores", "2", "--extra-heads", str(release)]
    assert launch.main(argv) == 0
    assert (out / "heads_fs2" / "1" / "model.onnx").read_bytes() == release.read_bytes()
    assert served_space(out / f"{ENSEMBLE}_fs2" / "config.pbtxt") == "fs2"
    assert launch.main([*argv[:-2]]) == 0  # the next start without it drops the release's models
    assert not (out / "heads_fs2").exists() and not (out / f"{ENSEMBLE}_fs2").exists()


def test_serve_cpu_writes_the_release_into_its_repository_then_execs_tritonserver(
    tmp_path: Path, onnx_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launch, "ONNX_DIR", onnx_dir)
    monkeypatch.setattr(launch, "CPU_REPOSITORY", tmp_path / "cpu")
    monkeypatch.setenv(PRECISION_ENV, "fp32")
    stand_in_heads(onnx_dir / "heads_fs2.onnx", "fs2")
    # A heads_fs2 left in the repository by an earlier start is rewritten, not served stale.
    (tmp_path / "cpu" / "heads_fs2" / "1").mkdir(parents=True)
    execs: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(launch.shutil, "which", lambda name: f"/opt/tritonserver/bin/{name}")
    monkeypatch.setattr(launch.os, "execv", lambda binary, command: execs.append((binary, command)))
    launch.main(["serve", "--profile", "cpu"])
    [(binary, command)] = execs
    flags = dict(arg[2:].split("=", 1) for arg in command[1:])
    assert binary == "/opt/tritonserver/bin/tritonserver"
    assert flags["model-repository"] == str(tmp_path / "cpu") and flags["model-control-mode"] == "none"
    model = tmp_path / "cpu" / "heads_fs2" / "1" / "model.onnx"
    assert model.read_bytes() == (onnx_dir / "heads_fs2.onnx").read_bytes()
    assert served_space(tmp_path / "cpu" / f"{ENSEMBLE}_fs2" / "config.pbtxt") == "fs2"


def test_serve_gpu_takes_no_extra_heads_its_prepared_repository_has_them(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        launch.main(["serve", "--profile", "gpu", "--repository", str(tmp_path), "--extra-heads", "x.onnx"])


def test_a_space_served_twice_or_a_missing_file_fails_the_start(
    tmp_path: Path, onnx_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(launch, "ONNX_DIR", onnx_dir)
    stand_in_heads(onnx_dir / "heads_fs2.onnx", "fs2")
    other = stand_in_heads(tmp_path / "other.onnx", "fs2")
    out = tmp_path / "models"
    assert launch.main(["prepare", "--profile", "gpu", "--out", str(out), "--extra-heads", str(other)]) == 1
    assert "feature space 'fs2' is served already" in capsys.readouterr().err
    same = [
        "prepare",
        "--profile",
        "gpu",
        "--out",
        str(out),
        "--extra-heads",
        str(onnx_dir / "heads_fs2.onnx"),
    ]
    assert launch.main(same) == 0  # the folder's own file named again counts once
    absent = tmp_path / "absent.onnx"
    assert launch.main(["prepare", "--profile", "gpu", "--out", str(out), "--extra-heads", str(absent)]) == 1
    assert f"{absent}: no such heads file" in capsys.readouterr().err


def test_the_triton_image_carries_a_release_next_to_heads_onnx() -> None:
    """An image built with build/onnx/heads_fs2.onnx holds it in the folder launch.py searches."""
    from tests.dockerfiles import copied_by, copies, env, in_context

    dockerfile = DEPLOY / "triton.Dockerfile"
    onnx_copies = [c for c in copies(dockerfile) if c.destination == "/opt/piaa/onnx/"]
    assert env(dockerfile)["PIAA_ONNX_DIR"] == "/opt/piaa/onnx"
    for rel in ("build/onnx/heads.onnx", "build/onnx/heads_fs2.onnx"):
        assert in_context(dockerfile, rel) and any(copied_by(c, rel) for c in onnx_copies), rel
    assert not in_context(dockerfile, "build/release/fs2/heads_fs2.onnx")
    assert not any(copied_by(c, "build/onnx/backbone.int8.calibration.json") for c in onnx_copies)
