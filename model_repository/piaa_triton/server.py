"""tritonserver's lifecycle: start on free loopback ports, wait until ready, stop, clean up /dev/shm.

Used by `make serve`, the tests and the benchmarks. `python -m piaa_triton.server` starts one and prints
its addresses until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from piaa_triton.backend import find_wheel, prepare
from piaa_triton.exceptions import ServerStartError
from piaa_triton.paths import backend_dir, repository_dir

SHM_ROOT = Path("/dev/shm")
RESTRICTED_APIS = ("shared-memory", "model-repository", "trace", "logging")
"""Triton APIs only callers with the per-start admin key may use (the same set as deploy/triton/launch.py):
nobody can map shared memory into the server or load models. Inference, health, metadata, statistics
and the (read-only) model config stay open to the loopback clients."""
ADMIN_HEADER = "piaa-triton-admin"
LOG_TAIL_CHARS = 6000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    """Initial size of each Python stub's shared-memory region (a batch of 16 images is ~9.6 MB)."""
    log_verbose: int = 0
    """tritonserver --log-verbose level."""
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
        self.process: subprocess.Popen[bytes] | None = None
        # The log outlives each start (read after a failed one); close() deletes it.
        self._log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="tritonserver-", suffix=".log", delete=False
        )
        self.log_path = Path(self._log_file.name)

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
            "--model-control-mode=none",
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
        for _ in range(
            0 if keep_ports and self.grpc_port else 5
        ):  # a port taken between free_port() and bind makes tritonserver exit; retry fresh ones
            self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
            if len({self.http_port, self.grpc_port, self.metrics_port}) == 3:
                break
        self.process = subprocess.Popen(
            self.command(),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.environment(),
            start_new_session=True,  # its own process group: the stubs are stopped with it
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.options.ready_timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                raise ServerStartError(
                    f"tritonserver exited with code {code} while loading:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.25)
        raise ServerStartError(
            f"tritonserver was not ready after {self.options.ready_timeout_s:.0f} s "
            f"(a Python stub that cannot start leaves a model loading forever):\n{self.log_tail()}"
        )

    def is_ready(self) -> bool:
        """Whether /v2/health/ready answers 200 (every model loaded)."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        """The server's whole log so far."""
        self._log_file.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self) -> str:
        return self.log()[-LOG_TAIL_CHARS:]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after stop_grace_s, to the server's process group; removes its /dev/shm.

        Safe to call twice.
        """
        process = self.process
        if process is not None and process.poll() is None:
            self._signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=self.options.stop_grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if process is not None:
            # Stubs outlive a server stopped while loading: kill the rest of the group, wait until it is gone.
            self._signal_group(process.pid, signal.SIGKILL)
            self._wait_group_gone(process.pid)
        self.remove_shm()

    @staticmethod
    def _signal_group(pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)

    @staticmethod
    def _wait_group_gone(pgid: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.05)

    def shm_regions(self) -> list[Path]:
        """The /dev/shm entries this server's Python stubs created (they carry our unique prefix)."""
        return sorted(SHM_ROOT.glob(f"{self.shm_prefix}*")) if SHM_ROOT.is_dir() else []

    def remove_shm(self) -> None:
        for region in self.shm_regions():
            region.unlink(missing_ok=True)

    def close(self) -> None:
        """stop(), then delete the log file."""
        self.stop()
        self._log_file.close()
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
