"""tritonserver's lifecycle: start on free loopback ports, wait until ready, stop, clean up /dev/shm.

Used by `make serve`, the tests and the benchmarks. `python -m piaa_triton.server` starts one and prints
its addresses until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from piaa_common.process import ManagedProcess, ProcessStartError, free_port, http_probe
from piaa_triton.backend import find_wheel, prepare
from piaa_triton.exceptions import ServerStartError
from piaa_triton.paths import backend_dir, repository_dir

SHM_ROOT = Path("/dev/shm")
RESTRICTED_APIS = ("shared-memory", "model-repository", "trace", "logging")
"""Triton APIs only callers with the per-start admin key may use (the same set as deploy/triton/launch.py):
nobody can map shared memory into the server or load models. Inference, health, metadata, statistics
and the (read-only) model config stay open to the loopback clients."""
ADMIN_HEADER = "piaa-triton-admin"
LOG_TAIL_LINES = 80
PORT_ATTEMPTS = 5
"""Starts with fresh ports when tritonserver exits because one was taken between choosing and binding."""


@dataclass
class ServerOptions:
    """How to run tritonserver. Explicit arguments only; the CLI maps flags onto this."""

    repository: Path = field(default_factory=lambda: repository_dir("cpu"))
    """The model repository to serve."""
    ready_timeout_s: float = 180.0
    """How long start() waits for /v2/health/ready (Python stubs load ONNX Runtime: slow on 2 cores)."""
    stop_grace_s: float = 20.0
    """After SIGTERM, how long to wait before SIGKILL."""
    shm_default_bytes: int = 16 * 1024 * 1024
    """Initial size of each Python stub's shared-memory region (a batch of 16 uint8 images is ~2.4 MB)."""
    log_verbose: int = 0
    """tritonserver --log-verbose level."""
    model_control: str = "none"
    """`none`: the repository is fixed at start; `explicit`: every model is loaded at start and more can
    be loaded while serving through the (admin-key) repository API, as a feature-space rollout does."""
    extra_args: tuple[str, ...] = ()


class TritonServer:
    """One tritonserver process on 127.0.0.1. Use as a context manager, or call start() / stop().

    Attributes once started: grpc_url ("127.0.0.1:PORT"), http_url and metrics_url ("http://127.0.0.1:PORT").
    """

    def __init__(self, options: ServerOptions | None = None) -> None:
        self.options = options or ServerOptions()
        self.shm_prefix = f"piaa_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        # Random per server and never printed: the restricted APIs answer nobody (tests read it from here).
        self.admin_key = secrets.token_hex(16)
        self.http_port = self.grpc_port = self.metrics_port = 0
        self._keep_ports = False
        # The log outlives each start (read after a failed one); close() deletes it.
        handle, log_name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
        os.close(handle)
        self.log_path = Path(log_name)
        self._ready_probe = http_probe(lambda: f"{self.http_url}/v2/health/ready")
        self._managed = ManagedProcess(
            self._next_command,
            ready=self._ready_probe,
            log_path=self.log_path,
            env=self.environment(),
            name="tritonserver",
            start_timeout_s=self.options.ready_timeout_s,
            stop_grace_s=self.options.stop_grace_s,
        )

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The last tritonserver process started (its pid is its process group's id), None before."""
        return self._managed.popen

    # --- addresses -----------------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    # --- lifecycle -----------------------------------------------------------------------------------
    def command(self) -> list[str]:
        """The tritonserver command line (ports must be chosen first)."""
        return [
            str(find_wheel().server_binary),
            f"--model-repository={self.options.repository}",
            f"--backend-directory={backend_dir()}",
            f"--model-control-mode={self.options.model_control}",
            *(["--load-model=*"] if self.options.model_control == "explicit" else []),
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=true",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            # Triton drains in-flight requests for this long on SIGTERM; it must end before our SIGKILL.
            f"--exit-timeout-secs={max(1, int(self.options.stop_grace_s) - 5)}",
            f"--log-verbose={self.options.log_verbose}",
            f"--grpc-restricted-protocol={','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={self.admin_key}",
            f"--http-restricted-api={','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={self.admin_key}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--backend-config=python,shm-default-byte-size={self.options.shm_default_bytes}",
            *self.options.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        """The server's environment: this venv's bin first on PATH (the stub runs the `python3` it finds)."""
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def start(self, keep_ports: bool = False) -> TritonServer:
        """Starts tritonserver and waits until it is ready. Returns self. `keep_ports` restarts a stopped
        server on its previous ports (clients reconnect to the same address).

        Raises ServerStartError (with the log's tail) when the repository is missing, the process exits,
        or it is not ready within ready_timeout_s; the process is stopped and cleaned up first.
        """
        if not (self.options.repository / "piaa" / "config.pbtxt").is_file():
            raise ServerStartError(
                f"no model repository at {self.options.repository}: run `python -m piaa_triton.repository "
                "--profile cpu` (after `python -m piaa_export.cli build`)"
            )
        prepare()
        self._keep_ports = keep_ports and bool(self.grpc_port)
        self._managed.port_attempts = 1 if self._keep_ports else PORT_ATTEMPTS
        try:
            self._managed.start(self.options.ready_timeout_s)
        except ProcessStartError as err:
            self.stop()
            if err.exit_code is None:
                raise ServerStartError(
                    f"tritonserver was not ready after {self.options.ready_timeout_s:.0f} s "
                    f"(a Python stub that cannot start leaves a model loading forever):\n{self.log_tail()}"
                ) from err
            raise ServerStartError(
                f"tritonserver exited with code {err.exit_code} while loading:\n{self.log_tail()}"
            ) from err
        except BaseException:
            self.stop()
            raise
        return self

    def _next_command(self) -> list[str]:
        """The command of the next start attempt: fresh ports unless the last ones are kept."""
        if not self._keep_ports:
            ports: set[int] = set()
            while len(ports) < 3:
                ports.add(free_port())
            self.http_port, self.grpc_port, self.metrics_port = sorted(ports)
        return self.command()

    def is_ready(self) -> bool:
        """Whether /v2/health/ready answers 200 (every model loaded)."""
        return self._ready_probe(self._managed)

    def is_running(self) -> bool:
        return self._managed.is_running()

    def log(self) -> str:
        """The server's whole log since its last start."""
        return self._managed.log()

    def log_tail(self) -> str:
        """The last LOG_TAIL_LINES lines of the log."""
        return self._managed.log_tail(LOG_TAIL_LINES)

    def stop(self) -> None:
        """SIGTERM to tritonserver (it stops its stubs), SIGKILL to its whole process group after
        stop_grace_s or once it exited (stubs outlive a server stopped while loading); removes its /dev/shm.

        Safe to call twice.
        """
        self._managed.stop()
        self.remove_shm()

    def shm_regions(self) -> list[Path]:
        """The /dev/shm entries this server's Python stubs created (they carry our unique prefix)."""
        return sorted(SHM_ROOT.glob(f"{self.shm_prefix}*")) if SHM_ROOT.is_dir() else []

    def remove_shm(self) -> None:
        for region in self.shm_regions():
            region.unlink(missing_ok=True)

    def close(self) -> None:
        """stop(), then delete the log file."""
        self.stop()
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """CLI: starts tritonserver on the cpu repository, prints its addresses, runs until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m piaa_triton.server", description=__doc__)
    parser.add_argument("--repository", type=Path, default=repository_dir("cpu"))
    parser.add_argument("--ready-timeout", type=float, default=ServerOptions.ready_timeout_s)
    parser.add_argument("--log-verbose", type=int, default=0)
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = TritonServer(
        ServerOptions(
            repository=args.repository, ready_timeout_s=args.ready_timeout, log_verbose=args.log_verbose
        )
    )
    try:
        server.start()
    except ServerStartError as err:
        print(f"error: {err}", file=sys.stderr)
        server.close()
        return 1
    print(f"grpc    {server.grpc_url}\nhttp    {server.http_url}\nmetrics {server.metrics_url}", flush=True)
    print(f"log     {server.log_path}", flush=True)
    try:
        while not stop.wait(1.0):
            if not server.is_running():
                print(f"tritonserver exited:\n{server.log_tail()}", file=sys.stderr)
                return 1
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
