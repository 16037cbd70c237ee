"""The gateway as a child process (the gateway alone, or `piaa serve`) for the tests, benchmarks and demo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from piaa_common.process import ManagedProcess, free_port
from piaa_personalization.api.server import READY_LINE

GATEWAY_MODULE = "piaa_personalization.api.server"
"""`python -m` target of the gateway alone (needs --redis-url and --triton-url)."""
SERVE_MODULE = "piaa_personalization.serve"
"""`python -m` target of `piaa serve` (Redis, Triton and the gateway)."""
LOG_TAIL_LINES = 60


def environment_without_piaa() -> dict[str, str]:
    """This process's environment without PIAA_* variables, so only the flags configure the child."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PIAA_")}


class GatewayProcess:
    """`python -u -m <module> <args>` on piaa_common.process, ready once it prints READY_LINE.

    `metrics` adds `--metrics-port` with a fresh free port at each start attempt (a taken one is retried).
    `env` defaults to environment_without_piaa(). The child gets SIGTERM when the thread that started it
    ends: the gateway then drains and `piaa serve` stops the Redis and Triton it started. As a context
    manager it starts (unless already running) and closes.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        module: str = GATEWAY_MODULE,
        metrics: bool = False,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        cwd: Path | None = None,
        start_timeout_s: float = 60.0,
        stop_grace_s: float = 30.0,
    ) -> None:
        self.args = list(args)
        self.module = module
        self.metrics_port = 0
        self._metrics = metrics
        self._managed = ManagedProcess(
            self._argv,
            ready=READY_LINE,
            log_path=log_path,
            env=environment_without_piaa() if env is None else env,
            cwd=cwd,
            name=module.rsplit(".", 1)[-1] if module != GATEWAY_MODULE else "gateway",
            start_timeout_s=start_timeout_s,
            stop_grace_s=stop_grace_s,
            port_attempts=3 if metrics else 1,
            death_signal=signal.SIGTERM,
        )

    def _argv(self) -> list[str]:
        argv = [sys.executable, "-u", "-m", self.module, *self.args]
        if self._metrics:
            self.metrics_port = free_port()
            argv += ["--metrics-port", str(self.metrics_port)]
        return argv

    @property
    def address(self) -> str:
        """HOST:PORT from the ready line ("" until the gateway serves)."""
        return self._managed.line_starting(READY_LINE) or ""

    @property
    def metrics_url(self) -> str:
        """The Prometheus endpoint of worker 0 ("" without `metrics`)."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics" if self.metrics_port else ""

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """The child process (None before start)."""
        return self._managed.popen

    @property
    def pid(self) -> int | None:
        return self._managed.pid

    @property
    def log_path(self) -> Path:
        return self._managed.log_path

    def start(self, timeout_s: float | None = None) -> GatewayProcess:
        """Starts the child and waits for its ready line; returns self.

        Raises piaa_common.process.ProcessStartError (a RuntimeError with the exit code and the output's
        last lines) when it exits first or is not ready in `timeout_s` (default start_timeout_s).
        """
        self._managed.start(timeout_s)
        return self

    def is_running(self) -> bool:
        return self._managed.is_running()

    def output(self) -> str:
        """Everything the child printed (stdout and stderr) since it started."""
        return self._managed.log()

    def line_starting(self, prefix: str) -> str | None:
        """The rest of the first output line that starts with `prefix`, or None."""
        return self._managed.line_starting(prefix)

    def output_tail(self) -> str:
        """The last LOG_TAIL_LINES lines of the output."""
        return self._managed.log_tail(LOG_TAIL_LINES)

    def metrics(self) -> str:
        """The current Prometheus text of worker 0."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as reply:
            return str(reply.read().decode())

    def stop(self, timeout_s: float | None = None) -> int:
        """SIGTERM (a graceful drain), SIGKILL to its process group after `timeout_s` (default
        stop_grace_s); returns the exit code (negative: the signal that ended it; 0 when never started)."""
        code = self._managed.stop(timeout_s)
        return 0 if code is None else code

    def close(self) -> None:
        """stop(), then delete the output if it went to a temporary file."""
        self._managed.close()

    def __enter__(self) -> GatewayProcess:
        return self if self.is_running() else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
