"""piaa_common.process on real python -c children (no sockets): ready, failures, group stop, parent death."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from piaa_common.process import ManagedProcess, ProcessStartError

PY = sys.executable


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_dead(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def script(code: str) -> list[str]:
    return [PY, "-u", "-c", textwrap.dedent(code)]


def test_ready_line_starts_and_stop_returns_the_exit_code(tmp_path: Path) -> None:
    child = ManagedProcess(
        script("""
            import signal, sys, time
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            print("loading", flush=True)
            print("serving on 127.0.0.1:1234", flush=True)
            while True:
                time.sleep(0.1)
        """),
        ready="serving on ",
        log_path=tmp_path / "child.log",
    )
    with child:
        assert child.is_running()
        assert child.line_starting("serving on ") == "127.0.0.1:1234"
        assert "loading" in child.log()
        pid = child.pid
        assert pid is not None and os.getpgid(pid) == pid  # its own process group
        assert child.stop() == 0  # SIGTERM handled: a clean exit
    assert not child.is_running() and child.returncode == 0
    assert (tmp_path / "child.log").exists()  # a given log is kept


def test_a_child_that_exits_early_is_reported_with_its_exit_code_and_log_tail() -> None:
    child = ManagedProcess(
        script("""
            import sys
            for i in range(100):
                print(f"line {i}")
            print("fatal: cannot open the thing", file=sys.stderr)
            sys.exit(3)
        """),
        ready="serving on ",
        name="broken",
    )
    with pytest.raises(ProcessStartError) as err:
        child.start(timeout_s=30)
    assert err.value.exit_code == 3
    assert "broken exited with code 3" in str(err.value)
    assert "fatal: cannot open the thing" in err.value.log_tail and "line 99" in err.value.log_tail
    assert "line 0\n" not in err.value.log_tail  # a tail, not the whole log
    log = child.log_path
    child.close()
    assert not log.exists()  # a temporary log is deleted


def test_a_child_that_never_gets_ready_times_out_and_is_stopped() -> None:
    child = ManagedProcess(script("import time\nprint('still loading')\ntime.sleep(600)"), ready="ready")
    started = time.monotonic()
    with pytest.raises(ProcessStartError, match=r"was not ready after 1 s\n.*still loading") as err:
        child.start(timeout_s=1)
    assert time.monotonic() - started < 20
    assert err.value.exit_code is None
    assert child.pid is not None and wait_dead(child.pid, 1)
    child.close()


def test_a_probe_callable_decides_readiness(tmp_path: Path) -> None:
    marker = tmp_path / "up"
    code = f"import pathlib, time\ntime.sleep(0.3)\npathlib.Path({str(marker)!r}).touch()\ntime.sleep(60)"
    child = ManagedProcess(
        script(code),
        ready=lambda _: marker.exists(),
    )
    with child:
        assert marker.exists() and child.is_running()


def test_a_taken_port_is_retried_with_a_fresh_argv_and_other_failures_are_not() -> None:
    attempts: list[int] = []

    def argv() -> list[str]:
        attempts.append(len(attempts))
        if len(attempts) < 3:
            return script("import sys\nprint('bind: Address already in use')\nsys.exit(1)")
        return script("import time\nprint('ok', flush=True)\ntime.sleep(600)")

    with ManagedProcess(argv, ready="ok", port_attempts=3):
        assert len(attempts) == 3
    attempts.clear()

    def other_failure() -> list[str]:
        attempts.append(len(attempts))
        return script("import sys\nprint('bad config')\nsys.exit(2)")

    with pytest.raises(ProcessStartError, match="bad config"):
        ManagedProcess(other_failure, ready="ok", port_attempts=3).start(timeout_s=30)
    assert len(attempts) == 1


def test_stop_kills_the_whole_group_including_a_grandchild_that_ignores_sigterm() -> None:
    child = ManagedProcess(
        script(f"""
            import signal, subprocess, time
            grandchild = subprocess.Popen([{PY!r}, "-c",
                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
            print(f"grandchild {{grandchild.pid}}", flush=True)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a child that will not go politely
            time.sleep(600)
        """),
        ready="grandchild ",
        stop_grace_s=0.5,
    )
    with child:
        grandchild = int(child.line_starting("grandchild ") or 0)
        assert alive(grandchild) and os.getpgid(grandchild) == child.pid
        code = child.stop()
    assert code == -signal.SIGKILL
    assert wait_dead(grandchild, 5), "the grandchild outlived stop()"


def test_the_child_dies_with_its_parent(tmp_path: Path) -> None:
    """The parent (a python process using ManagedProcess) is SIGKILLed: no chance to clean up, yet its
    child goes too (PR_SET_PDEATHSIG)."""
    log = tmp_path / "child.log"  # the parent dies before it could delete a temporary one
    parent = subprocess.Popen(
        script(f"""
            import sys, time
            from piaa_common.process import ManagedProcess
            child = ManagedProcess([sys.executable, "-u", "-c",
                                    "import time; print('up', flush=True); time.sleep(600)"], ready="up",
                                   log_path={str(log)!r})
            child.start(timeout_s=60)
            print(child.pid, flush=True)
            time.sleep(600)
        """),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert alive(child_pid)
        parent.kill()
        parent.wait(timeout=10)
        assert wait_dead(child_pid, 10), "the child outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_a_running_child_cannot_be_started_twice_and_can_be_restarted_after_stop() -> None:
    child = ManagedProcess(script("import time\nprint('up', flush=True)\ntime.sleep(600)"), ready="up")
    with child:
        first = child.pid
        with pytest.raises(RuntimeError, match="already running"):
            child.start()
        child.stop(grace_s=0)
        child.start()
        assert child.pid != first and child.is_running()
