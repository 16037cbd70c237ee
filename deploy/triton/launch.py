"""Triton container entry: write the model repository, build TensorRT engines on this GPU, serve, probe.

Runs inside the NGC Triton image (deploy/triton.Dockerfile), with our sources on PYTHONPATH:
  launch.py prepare --profile gpu --out /models --engines  # one-shot engine build (compose, initContainer)
  launch.py serve --profile gpu --repository /models       # tritonserver on the prepared repository
  launch.py serve --profile cpu                            # cpu repository for this pod's cores, then serve
  launch.py ready                                          # exit 0 when /v2/health/ready answers 200
A release's heads (heads_<fs>.onnx in the image's ONNX folder, or --extra-heads PATH) are served side by
side as heads_<fs> + piaa_<fs> by prepare and serve alike; a rollout restarts the replicas onto such an image.
The repository comes from piaa_triton.repository (one typed description), never from hand-written configs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from piaa_triton.config import PYTHON_SHM_DEFAULT_BYTES, parse
from piaa_triton.exceptions import RepositoryError
from piaa_triton.repository import PROFILES, feature_space_of, write_repository

HTTP_PORT = 8000
"""Triton's HTTP/REST port: health probes (/v2/health/live, /v2/health/ready)."""
GRPC_PORT = 8001
"""Triton's gRPC port: what the gateway's PIAA_TRITON_URL points at."""
METRICS_PORT = 8002
"""Triton's Prometheus /metrics port."""
ONNX_DIR = Path(os.environ.get("PIAA_ONNX_DIR", "/opt/piaa/onnx"))
"""The parity-checked ONNX models baked into the image (copied from build/onnx)."""
CPU_REPOSITORY = Path("/tmp/piaa-models/cpu")
"""Where `serve --profile cpu` writes its repository (planned for this container's cores)."""
RELEASE_HEADS = "heads_*.onnx"
"""Heads files of further feature spaces in the ONNX folder (piaa_export.release names them so): an image
that carries a release serves them beside heads.onnx without any flag."""


@dataclass(frozen=True)
class EngineJob:
    """One TensorRT engine to build: a tensorrt_plan model of the repository and its ONNX source(s).

    Batch size and precision are read from the model's generated config.pbtxt, which is also what the
    exporter reads, so the job and the engine cannot disagree with what Triton loads.
    """

    name: str
    onnx: Path
    model_dir: Path
    max_batch_size: int
    precision: str
    int8_onnx: Path | None = None

    @property
    def version_dir(self) -> Path:
        return self.model_dir / "1"

    def command(self, parity_photos: Path | None = None) -> list[str]:
        """The exporter's `engines` subcommand for this model (python -m piaa_export.cli engines ...)."""
        command = [sys.executable, "-m", "piaa_export.cli", "engines", str(self.onnx), str(self.model_dir)]
        if self.int8_onnx is not None:
            command += ["--int8-onnx", str(self.int8_onnx)]
        if parity_photos is not None:
            command += ["--parity-photos", str(parity_photos)]
        return command


def available_cores(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this container may use: its cgroup v2 CPU quota (a Kubernetes limit) if set, else all."""
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return len(os.sched_getaffinity(0))


def extra_heads(onnx_dir: Path = ONNX_DIR, paths: Sequence[Path] = ()) -> list[Path]:
    """The heads files of further feature spaces to serve: every RELEASE_HEADS file of `onnx_dir`, then
    `paths` (--extra-heads), each file once. Raises FileNotFoundError for a path that is not a file."""
    found = sorted(onnx_dir.glob(RELEASE_HEADS)) if onnx_dir.is_dir() else []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such heads file")
        if path.resolve() not in {f.resolve() for f in found}:
            found.append(path)
    return found


def engine_jobs(repository: Path, onnx_dir: Path = ONNX_DIR, heads: Sequence[Path] = ()) -> list[EngineJob]:
    """The engines a generated repository needs: one per tensorrt_plan model, with its config's batch size
    and precision (int8 also needs the Q/DQ model, paths.BACKBONE_INT8_ONNX, for the backbone). A model
    <name> builds from onnx_dir/<name>.onnx, or, for heads_<fs>, from the file of `heads` naming that space.

    Raises FileNotFoundError when an ONNX source of one of them is missing.
    """
    from piaa_triton.paths import BACKBONE_INT8_ONNX

    sources = {f"heads_{feature_space_of(path)}": path for path in heads}
    jobs = []
    for config in sorted(repository.glob("*/config.pbtxt")):
        model = parse(config.read_text())
        if model.platform != "tensorrt_plan":
            continue
        onnx = sources.get(model.name, onnx_dir / f"{model.name}.onnx")
        precision = model.parameters["precision"].string_value if "precision" in model.parameters else "fp32"
        int8_onnx = onnx_dir / BACKBONE_INT8_ONNX if precision == "int8" else None
        for needed in (onnx, int8_onnx):
            if needed is not None and not needed.is_file():
                raise FileNotFoundError(f"{needed}: the image lacks the ONNX model for {model.name}")
        jobs.append(EngineJob(model.name, onnx, config.parent, model.max_batch_size, precision, int8_onnx))
    return jobs


def is_current(job: EngineJob, cc: str, tensorrt_version: str) -> bool:
    """Whether the exporter already built this engine for this GPU (compute capability `cc`, "9.0"),
    this TensorRT, these ONNX bytes, batch size and precision (read from the build JSON it writes next to
    model_sm<cc>.plan), so a restarted engine step on the same volume rebuilds nothing."""
    from piaa_export.sources import file_sha256
    from piaa_triton.paths import plan_filename

    plan = job.version_dir / plan_filename(cc)
    try:
        info = json.loads(plan.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return False
    config = info.get("config", {})
    int8_sha = info.get("source_checks", {}).get("int8_onnx_sha256")
    return (
        plan.is_file()
        and info.get("tensorrt") == tensorrt_version
        and info.get("onnx_sha256") == file_sha256(job.onnx)
        and (job.int8_onnx is None or int8_sha == file_sha256(job.int8_onnx))
        and config.get("max_batch_size") == job.max_batch_size
        and config.get("precision") == job.precision
    )


def link_default_plan(job: EngineJob, cc: str) -> Path:
    """Points <model>/1/model.plan at this GPU's model_sm<cc>.plan and returns it.

    The generated config maps the common compute capabilities to their plans (cc_model_filenames) and
    falls back to model.plan for any other GPU kind: this link makes that fallback the engine just built.
    """
    from piaa_triton.paths import plan_filename

    link = job.version_dir / "model.plan"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(plan_filename(cc))
    return link


def build_engines(
    repository: Path, onnx_dir: Path = ONNX_DIR, parity_photos: Path | None = None, heads: Sequence[Path] = ()
) -> list[str]:
    """Builds every engine of the repository that is missing or stale on this GPU (`heads`: the extra heads
    files it was written with, see engine_jobs); returns the names built.

    Raises subprocess.CalledProcessError when the exporter fails (the one-shot service / init container then
    fails, and Triton, which waits for it to succeed, never starts on a half-built repository), and the
    exporter's TensorRTUnavailableError without TensorRT or a GPU.
    """
    import tensorrt  # only in the GPU image (install_tensorrt_bindings.sh)

    from piaa_export.onnx2trt import compute_capability

    cc, trt = compute_capability(), str(tensorrt.__version__)
    built = []
    for job in engine_jobs(repository, onnx_dir, heads):
        if is_current(job, cc, trt):
            print(f"{job.name}: engine up to date (sm {cc}, TensorRT {trt})", flush=True)
        else:
            command = job.command(parity_photos)
            print(f"{job.name}: building {job.precision} for sm {cc}, TensorRT {trt}: {' '.join(command)}")
            subprocess.run(command, check=True)
            built.append(job.name)
        link_default_plan(job, cc)
    return built


RESTRICTED_GRPC = ("shared-memory", "model-repository", "trace", "logging")
"""gRPC APIs no client may call: the gateway only infers and reads health, metadata and the ensemble's
config (its max_batch_size, read-only), so model-config stays open."""
RESTRICTED_HTTP = ("shared-memory", "model-repository", "trace", "logging")
"""The same APIs over HTTP (which serves only the kubelet's / Docker's health probes)."""
ADMIN_HEADER = "piaa-triton-admin"


def server_command(
    repository: Path,
    profile: str,
    ports: tuple[int, int, int] = (HTTP_PORT, GRPC_PORT, METRICS_PORT),
    admin_key: str | None = None,
) -> list[str]:
    """The tritonserver command line both compose and Kubernetes run: `ports` = (http, grpc, metrics).

    The restricted APIs answer only calls that carry the header ADMIN_HEADER=admin_key; by default the key
    is random per start and never printed, so nobody can reach them (shared memory, model control).
    """
    http, grpc, metrics = ports
    key = f"{ADMIN_HEADER}={admin_key or secrets.token_hex(16)}"
    return [
        "tritonserver",
        f"--model-repository={repository}",
        "--model-control-mode=none",  # no load/unload: the repository is fixed at start
        f"--http-port={http}",
        f"--grpc-port={grpc}",
        "--allow-metrics=true",
        f"--metrics-port={metrics}",
        f"--allow-gpu-metrics={'true' if profile == 'gpu' else 'false'}",
        "--strict-readiness=true",  # ready only when every model is: what the readiness probes rely on
        "--exit-on-error=true",
        f"--grpc-restricted-protocol={','.join(RESTRICTED_GRPC)}:{key}",
        f"--http-restricted-api={','.join(RESTRICTED_HTTP)}:{key}",
        f"--backend-config=python,shm-default-byte-size={PYTHON_SHM_DEFAULT_BYTES}",
    ]


def ready(url: str = f"http://127.0.0.1:{HTTP_PORT}/v2/health/ready", timeout_s: float = 3.0) -> bool:
    """Whether Triton answers 200 on its readiness endpoint (the container health check)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def build_parser() -> argparse.ArgumentParser:
    """The CLI's flags (compose and the Kubernetes manifests pass these; the tests parse theirs with it)."""
    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write a profile's repository (and, for gpu, its engines)")
    p.add_argument("--profile", choices=PROFILES, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cores", type=int, default=None, help="cpu plan for N cores (default: this container's)")
    p.add_argument("--engines", action="store_true", help="build missing or stale TensorRT engines")
    p.add_argument("--parity-photos", type=Path, default=None, help="photos for the engines' parity check")
    s = sub.add_parser("serve", help="exec tritonserver on a repository")
    s.add_argument("--profile", choices=PROFILES, required=True)
    s.add_argument("--repository", type=Path, default=None, help="gpu: the prepared one (cpu: written now)")
    for command in (p, s):
        command.add_argument(
            "--extra-heads",
            type=Path,
            action="append",
            default=[],
            help=f"a heads file of another feature space to serve beside heads.onnx, besides the "
            f"{RELEASE_HEADS} of the ONNX folder (heads_<fs> + piaa_<fs>); repeatable (serve: cpu only)",
        )
    sub.add_parser("ready", help="exit 0 when Triton is ready")
    return parser


def _write(profile: str, out: Path, cores: int | None, paths: Sequence[Path]) -> list[Path] | None:
    """Writes a profile's repository with the extra heads and says what it serves; returns those heads,
    or None after printing why the repository cannot be written (a missing file, two heads of one space)."""
    try:
        heads = extra_heads(ONNX_DIR, paths)
        changed = write_repository(profile, out, ONNX_DIR, cores or available_cores(), extra_heads=heads)
    except (RepositoryError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return None
    spaces = ", ".join(f"{feature_space_of(h)} ({h})" for h in heads) or "none"
    print(f"{profile} repository at {out}: {len(changed)} file(s) written; extra heads: {spaces}", flush=True)
    return heads


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: prepare / serve / ready (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "ready":
        return 0 if ready() else 1
    if args.command == "prepare":
        if args.engines and args.profile != "gpu":
            parser.error("--engines goes with --profile gpu")
        heads = _write(args.profile, args.out, args.cores, args.extra_heads)
        if heads is None:
            return 1
        if args.engines:
            build_engines(args.out, parity_photos=args.parity_photos, heads=heads)
        return 0
    repository = args.repository
    if args.profile == "cpu":
        repository = repository or CPU_REPOSITORY
        if _write("cpu", repository, None, args.extra_heads) is None:
            return 1
    elif args.extra_heads:
        parser.error("serve --profile gpu serves the prepared repository: give --extra-heads to prepare")
    elif repository is None or not (repository / "piaa" / "config.pbtxt").is_file():
        parser.error("serve --profile gpu needs --repository with a prepared repository")
    command = server_command(repository, args.profile)
    binary = shutil.which(command[0])
    if binary is None:
        print("tritonserver is not on PATH: run this in the Triton image", file=sys.stderr)
        return 1
    os.execv(binary, command)  # Triton becomes the container's main process and gets its signals


if __name__ == "__main__":
    sys.exit(main())
