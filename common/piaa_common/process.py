"""Child processes started, probed for readiness, and stopped with their whole process group, in one way.

`ManagedProcess` runs one command with its stdout and stderr in a log file, in its own process group, and
(on Linux) with a parent-death signal, so a test run or a server killed outright leaves no child behind.
`start()` waits for a readiness probe (a line in the log, an HTTP or TCP check, any callable), picks
fresh ports and tries again when the child says its port was taken, and raises `ProcessStartError` with
the exit code and the log's last lines. `stop()` sends SIGTERM to the child, waits a grace period, then
SIGKILLs the whole group. `free_port()` is the one port picker of the tree.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

ReadyProbe = Callable[["ManagedProcess"], bool]
"""Called with the running process until it returns True (it should return quickly; exceptions are bugs)."""

PORT_TAKEN = re.compile(r"address already in use|already in use|failed to bind|EADDRINUSE", re.IGNORECASE)
"""What redis-server, tritonserver and gRPC print when the port they were given is taken."""

_PR_SET_PDEATHSIG = 1
_TAIL_BYTES = 64 * 1024


class ProcessStartError(RuntimeError):
    """The child exited or was not ready in time. `exit_code` is None when it was still running (and was
    stopped); `log_tail` holds the log's last lines, which the message carries too."""

    def __init__(self, message: str, exit_code: int | None, log_tail: str) -> None:
        super().__init__(f"{message}\n{log_tail}" if log_tail else message)
        self.exit_code = exit_code
        self.log_tail = log_tail


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listened on a moment ago.

    Another process can take it before the caller binds it: start such children through ManagedProcess
    with `port_attempts > 1` and an argv callable that picks fresh ports.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def line_probe(prefix: str) -> ReadyProbe:
    """A probe that is ready once a log line starts with `prefix`."""
    return lambda process: process.line_starting(prefix) is not None


def http_probe(url: Callable[[], str], timeout_s: float = 2.0) -> ReadyProbe:
    """A probe that is ready once GET url() answers 200 (url is read at each try: ports can change)."""

    def probe(_: ManagedProcess) -> bool:
        try:
            with urllib.request.urlopen(url(), timeout=timeout_s) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    return probe


def tcp_probe(host: str, port: Callable[[], int], timeout_s: float = 1.0) -> ReadyProbe:
    """A probe that is ready once host:port() accepts a TCP connection."""

    def probe(_: ManagedProcess) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            return sock.connect_ex((host, port())) == 0

    return probe


def _find_prctl() -> Callable[..., int] | None:
    # Resolved in the parent: after fork the child only calls a function pointer, no imports or dlopen.
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _find_prctl()


def die_with_parent(parent_pid: int, death_signal: int = signal.SIGTERM) -> None:
    """Asks the kernel to send `death_signal` to this process when its parent ends (Linux only).

    Call it first thing in a child (between fork and exec, or at the top of a multiprocessing target);
    exits at once when the parent already died before the request could be made.
    """
    if _PRCTL is None:
        return
    _PRCTL(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl: nothing would signal us
        os._exit(1)


def _child_setup(parent_pid: int, death_signal: int) -> Callable[[], None] | None:
    """The hook run in the child between fork and exec: die with the parent (Linux only)."""
    if _PRCTL is None:
        return None
    return lambda: die_with_parent(parent_pid, death_signal)


class ManagedProcess:
    """One child process: its own process group, output in a log file, dies with the thread that started it.

    `argv` is the command, or a callable returning it: the callable is called at each attempt, so it can
    choose fresh ports. `ready` is a probe called with this object, or a string: the prefix of the line the
    child prints once it serves. `log_path` defaults to a temporary file that close() deletes; a given one
    is kept. `port_attempts` > 1 starts again when the child exits and its log matches PORT_TAKEN.
    `death_signal` is what the child gets when the thread that started it ends (Linux's PR_SET_PDEATHSIG
    follows the starting thread, not the process: start from a thread that lives as long as the child).

    Use as a context manager (start() … close()) or call start() / stop() / close().
    """

    def __init__(
        self,
        argv: Sequence[str] | Callable[[], Sequence[str]],
        *,
        ready: ReadyProbe | str,
        log_path: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        name: str | None = None,
        start_timeout_s: float = 60.0,
        stop_grace_s: float = 10.0,
        port_attempts: int = 1,
        death_signal: int = signal.SIGKILL,
    ) -> None:
        self._argv = argv
        self._probe: ReadyProbe = line_probe(ready) if isinstance(ready, str) else ready
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self.port_attempts = max(1, port_attempts)
        self.death_signal = death_signal
        self._own_log = log_path is None
        if log_path is None:
            handle, name_ = tempfile.mkstemp(prefix="piaa-process-", suffix=".log")
            os.close(handle)
            log_path = Path(name_)
        self.log_path = Path(log_path)
        # A temporary log goes with close(), or with this object when callers only stop() it.
        self._remove_log = weakref.finalize(self, _unlink, self.log_path) if self._own_log else None
        self.name = name or (Path(argv[0]).name if not callable(argv) else "process")
        self.popen: subprocess.Popen[bytes] | None = None
        """The last child started (kept after it exits, for its pid and return code)."""
        self._log: IO[bytes] | None = None

    # --- state ---------------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The child's pid (its process group id too), None before the first start."""
        return self.popen.pid if self.popen is not None else None

    @property
    def returncode(self) -> int | None:
        """The child's exit code once it exited (negative: killed by that signal), else None."""
        return self.popen.poll() if self.popen is not None else None

    def is_running(self) -> bool:
        """Whether the child was started and has not exited."""
        return self.popen is not None and self.popen.poll() is None

    # --- the log -----------------------------------------------------------------------------------------
    def log(self) -> str:
        """Everything the child printed since its last start ("" when there is no log yet)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines of the log."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - _TAIL_BYTES))
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def line_starting(self, prefix: str) -> str | None:
        """The rest of the first complete log line that starts with `prefix` (stripped), or None."""
        for line in self.log().splitlines(keepends=True):
            if line.startswith(prefix) and line.endswith("\n"):
                return line[len(prefix) :].strip()
        return None

    # --- lifecycle ---------------------------------------------------------------------------------------
    def start(self, timeout_s: float | None = None) -> ManagedProcess:
        """Starts the child and waits until the probe says ready; returns self.

        Raises ProcessStartError (exit code, log tail) when the child exits first (after `port_attempts`
        tries if its port was taken) or is not ready within `timeout_s` (default start_timeout_s); the
        child's group is stopped before raising. Raises RuntimeError when it is already running.
        """
        if self.is_running():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        timeout_s = self.start_timeout_s if timeout_s is None else timeout_s
        for attempt in range(1, self.port_attempts + 1):
            self._spawn()
            try:
                if self._wait_ready(timeout_s):
                    return self
            except BaseException:
                self.stop(grace_s=0)
                raise
            code = self.popen.poll() if self.popen is not None else None
            self.stop(grace_s=0)
            tail = self.log_tail()
            if code is None:
                raise ProcessStartError(f"{self.name} was not ready after {timeout_s:.0f} s", None, tail)
            if attempt == self.port_attempts or not PORT_TAKEN.search(tail):
                raise ProcessStartError(f"{self.name} exited with code {code} while starting", code, tail)
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        argv = [str(a) for a in (self._argv() if callable(self._argv) else self._argv)]
        self._close_log()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")  # truncated: a ready line from an earlier start must not count
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,  # its own process group: stop() reaches its children too
            preexec_fn=_child_setup(os.getpid(), self.death_signal),  # noqa: PLW1509
        )

    def _wait_ready(self, timeout_s: float) -> bool:
        """True once ready; False when the child exited or the time ran out (then it still runs)."""
        assert self.popen is not None
        deadline = time.monotonic() + timeout_s
        delay = 0.02
        while True:
            if self.popen.poll() is not None:
                # It may have printed its ready line and then exited: that is an exit, not a start.
                return False
            if self._probe(self):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def stop(self, grace_s: float | None = None) -> int | None:
        """Stops the child and everything in its process group; safe to call at any time, and twice.

        SIGTERM goes to the child alone (it stops its own children: Triton its stubs, the gateway its
        workers); after `grace_s` (default stop_grace_s) the whole group gets SIGKILL, and once the child
        is gone so does anything left in its group. Returns the child's exit code (negative: the signal
        that ended it), or None when it was never started.
        """
        popen = self.popen
        if popen is None:
            return None
        grace_s = self.stop_grace_s if grace_s is None else grace_s
        if popen.poll() is None and grace_s > 0:
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=grace_s)
        _signal_group(popen.pid, signal.SIGKILL)
        popen.wait(timeout=30)
        _wait_group_gone(popen.pid)
        self._close_log()
        return popen.returncode

    def close(self) -> None:
        """stop(), then delete the log if it is a temporary one."""
        self.stop()
        if self._remove_log is not None:
            self._remove_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_group_gone(pgid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.02)
