"""The store's Redis connection, the same for one node and a Redis Cluster: client, errors, scripts, WAIT.

`connect` returns redis-py's `redis.asyncio.Redis` (standalone) or `redis.asyncio.RedisCluster` (cluster);
both speak the same commands and non-transactional pipelines (a cluster pipeline groups its commands by
node and sends one pipeline per node, in parallel). What differs is handled here: which node a key lives
on (round-trip counting, WAIT on the writer's connection), SCAN over every primary, and which node the
change listener subscribes to.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.backoff import ExponentialBackoff
from redis.exceptions import ClusterError, NoScriptError, RedisClusterException, RedisError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig
from redis.retry import Retry

from piaa_personalization.store.format import StoreError, StoreUnavailable

MODES = ("standalone", "cluster")
"""`standalone`: one Redis (a primary, optionally with replicas). `cluster`: Redis Cluster; the URL names
any one node and the client discovers the rest."""

Client = aioredis.Redis | aioredis.RedisCluster


@dataclass(frozen=True)
class ConnectionSettings:
    """What `connect` needs (a subset of StoreConfig, kept here so this module does not import the store)."""

    url: str
    mode: str
    socket_timeout_s: float
    connect_timeout_s: float
    max_connections: int
    pool_timeout_s: float
    retries: int


def connect(s: ConnectionSettings) -> Client:
    """A lazily connecting client for `s.mode`; raises ValueError for an unknown mode."""
    if s.mode not in MODES:
        raise ValueError(f"redis mode is one of {MODES}, got {s.mode!r}")
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.02), s.retries)
    # No CLIENT command on connect: no SETINFO (driver_info=None) and no maintenance-notifications
    # handshake (a Redis Enterprise feature that redis-py tries on every RESP3 connection). The
    # least-privilege ACL user (acl_rules) may not send CLIENT; redis-py ignores the refusal, but Redis
    # logs each one as an ACL denial.
    if s.mode == "cluster":
        # redis-py retries a command that met a dead node or a failover (MOVED, CLUSTERDOWN) after
        # refreshing the slot map, `retries` times; each node gets its own pool of max_connections.
        return aioredis.RedisCluster.from_url(
            s.url,
            max_connections=s.max_connections,
            socket_timeout=s.socket_timeout_s,
            socket_connect_timeout=s.connect_timeout_s,
            retry=retry,
            require_full_coverage=False,
            **_NO_CLIENT_COMMANDS,
        )
    # A blocking pool: under a burst, callers wait for a free connection (bounded by the pool timeout)
    # instead of failing with "Too many connections".
    pool = aioredis.BlockingConnectionPool.from_url(
        s.url,
        max_connections=s.max_connections,
        timeout=s.pool_timeout_s,
        socket_timeout=s.socket_timeout_s,
        socket_connect_timeout=s.connect_timeout_s,
        retry=retry,
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        **_NO_CLIENT_COMMANDS,
    )
    return aioredis.Redis(connection_pool=pool)


@contextlib.asynccontextmanager
async def errors() -> AsyncIterator[None]:
    """Maps redis-py's exceptions onto the store's: unreachable nodes, timeouts, a cluster without a
    primary for a slot (failover, no quorum) and slots in migration are StoreUnavailable (retryable)."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError) as e:
        raise StoreUnavailable(f"redis unavailable: {e}") from e
    except (ClusterError, TryAgainError) as e:  # CLUSTERDOWN, MASTERDOWN, TRYAGAIN, TTL exhausted
        raise StoreUnavailable(f"redis cluster unavailable: {e}") from e
    except RedisClusterException as e:  # no node reachable to learn the slots from, slot not covered
        raise StoreUnavailable(f"redis cluster unavailable: {e}") from e
    except RedisError as e:
        raise StoreError(f"redis error: {e}") from e


class Script:
    """A Lua script run by EVALSHA, falling back to EVAL (which caches it on that node) on NOSCRIPT:
    in a cluster every primary, and every replica promoted after a failover, has its own script cache."""

    def __init__(self, body: str) -> None:
        self.body = body
        self.sha = hashlib.sha1(body.encode()).hexdigest()

    def queue(self, pipe: Any, keys: Sequence[str], args: Sequence[Any], *, by_body: bool = False) -> None:
        """Adds the call to a pipeline (EVALSHA, or EVAL when `by_body`)."""
        head = ("EVAL", self.body) if by_body else ("EVALSHA", self.sha)
        pipe.execute_command(*head, len(keys), *keys, *args)


class Connection:
    """The client plus what differs between modes; counts round trips per node through `on_round_trip`."""

    def __init__(
        self,
        client: Client,
        on_round_trip: Callable[[str, str], None] | None = None,
        *,
        max_in_flight: int = 64,
        wait_s: float = 10.0,
        resends: int = 0,
    ) -> None:
        self.client = client
        self.cluster = isinstance(client, aioredis.RedisCluster)
        self.on_round_trip = on_round_trip
        self.on_error: Callable[[str], None] | None = None
        """Called with "unavailable" or "error" for each operation that fails (metrics)."""
        # redis-py's cluster pools do not block: past max_connections a node raises, and a pipeline that
        # meets that error closes the whole client. Operations wait here instead (at most wait_s).
        self._in_flight = asyncio.Semaphore(max_in_flight) if self.cluster else None
        self._wait_s = wait_s
        self._sub_nodes = itertools.count()
        self.resends = resends
        """How many times eval_durable sends a script again after a timeout or a lost connection."""
        self._sub_clients: dict[str, aioredis.Redis] = {}
        self._watchers: list[tuple[Callable[[bytes | str], None], Callable[[], None]]] = []

    def watch(self, on_message: Callable[[bytes | str], None], on_lost: Callable[[], None]) -> None:
        """Calls `on_message(data)` with every message a subscription made through `subscriber()`
        receives (before its listener sees it), and `on_lost()` when that subscription fails (messages
        may have been missed). The store's prior cache watches the change channel this way."""
        self._watchers.append((on_message, on_lost))

    async def node_of(self, key: str) -> ClusterNode | None:
        """The primary that serves `key` now (None on a standalone Redis)."""
        if not isinstance(self.client, aioredis.RedisCluster):
            return None
        await self.client.initialize()
        return self.client.get_node_from_key(key)

    async def count(self, op: str, keys: Sequence[str]) -> None:
        """Reports one round trip of `op` to every node that holds one of `keys` (a cluster pipeline
        sends one request per node, in parallel)."""
        if self.on_round_trip is None:
            return
        if not isinstance(self.client, aioredis.RedisCluster):
            self.on_round_trip(op, "standalone")
            return
        await self.client.initialize()
        names = {getattr(self.client.get_node_from_key(k), "name", "?") for k in keys}
        for name in names:
            self.on_round_trip(op, name)

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Around every operation: waits for an in-flight slot (cluster), maps errors (`errors`) and
        reports each to `on_error`."""
        try:
            async with errors():
                if self._in_flight is None:
                    yield
                    return
                try:
                    await asyncio.wait_for(self._in_flight.acquire(), self._wait_s)
                except TimeoutError:
                    raise StoreUnavailable(f"no free redis connection within {self._wait_s} s") from None
                try:
                    yield
                finally:
                    self._in_flight.release()
        except StoreError as e:
            if self.on_error is not None:
                self.on_error("unavailable" if isinstance(e, StoreUnavailable) else "error")
            raise

    async def pipeline(self, op: str, keys: Sequence[str], fill: Callable[[Any], None]) -> list[Any]:
        """One pipelined round trip (per node, in parallel, in a cluster): `fill(pipe)` adds the commands,
        `keys` are the keys they touch (for counting). Raises the first command's error."""
        await self.count(op, keys)
        async with self.guard():
            pipe = self.client.pipeline(transaction=False)
            fill(pipe)
            return list(await pipe.execute())

    async def eval_durable(
        self, script: Script, keys: Sequence[str], args: Sequence[Any], *, acks: int, timeout_ms: int
    ) -> Any:
        """Runs an always-writing script on its keys' node and, with `acks` > 0, WAITs on the same
        connection until that many replicas have everything the node wrote up to it.

        The script must be idempotent: it is sent again after a timeout or a lost connection (up to
        `resends` times, with backoff; a redirection, or a WAIT that ran on a node that lost the keys,
        also sends it again), and it may have run already (the reply was lost, not the request). The
        store's append is made so by a call key (format.md, "Resends"), its commit by its rule that
        coverage only grows, the delete by being a delete.

        Returns the script's reply. Raises StoreUnavailable when fewer replicas acknowledged within
        `timeout_ms` (the write may then exist on the primary only: the caller must not report success).
        """
        by_body = False
        moves = resends = 0
        while True:
            node = await self.node_of(keys[0])
            await self.count("write", keys[:1])
            try:
                async with self.guard():
                    pipe = self.client.pipeline(transaction=False)
                    script.queue(pipe, keys, args, by_body=by_body)
                    if acks > 0:
                        target = {"target_nodes": node} if node is not None else {}
                        pipe.execute_command("WAIT", acks, timeout_ms, **target)
                    reply, *waited = await pipe.execute(raise_on_error=False)
            except StoreUnavailable as e:  # the client raised (standalone): a timeout, a lost connection
                reply = e.__cause__ if isinstance(e.__cause__, _RESENDABLE) else e
            if isinstance(reply, _RESENDABLE) and resends < self.resends:
                # The reply is lost, not necessarily the request: the script may have run. It is
                # idempotent (see above), so sending it again is safe and finds its own work done.
                resends += 1
                await asyncio.sleep(min(0.5, 0.02 * 2**resends))
                continue
            if isinstance(reply, NoScriptError) and not by_body:
                by_body = True
                continue
            if isinstance(reply, StoreError):
                raise reply
            if isinstance(reply, Exception):
                async with errors():
                    raise reply
            if acks <= 0:
                return reply
            now = await self.node_of(keys[0])
            if node is not None and now is not None and now.name != node.name:
                # Redirected during a reshard or failover: WAIT ran on the old node. Run again.
                moves += 1
                if moves >= 3:
                    raise StoreUnavailable("the keys kept moving between nodes (resharding); retry later")
                continue
            if isinstance(waited[0], Exception):
                async with errors():
                    raise waited[0]
            if int(waited[0]) < acks:
                raise StoreUnavailable(
                    f"the write reached {int(waited[0])} of {acks} replicas within {timeout_ms} ms: "
                    "not acknowledged (retry later)"
                )
            return reply

    async def primaries(self) -> list[ClusterNode | None]:
        """Every primary (one None for a standalone Redis): what SCAN must visit to see every key."""
        if not isinstance(self.client, aioredis.RedisCluster):
            return [None]
        async with errors():
            await self.client.initialize()
        return list(self.client.get_primaries())

    async def scan(self, pattern: str, count: int) -> AsyncIterator[list[bytes]]:
        """Batches of keys matching `pattern`, from every primary."""
        for node in await self.primaries():
            target: dict[str, Any] = {"target_nodes": node} if node is not None else {}
            cursor = 0
            while True:
                async with self.guard():
                    reply = await self.client.execute_command(
                        "SCAN", cursor, "MATCH", pattern, "COUNT", count, **target
                    )
                cursor, keys = reply
                if isinstance(cursor, dict):  # redis-py's cluster reply: {node name: cursor}
                    (cursor,) = cursor.values()
                if keys:
                    yield [k if isinstance(k, bytes) else k.encode() for k in keys]
                if cursor == 0:
                    break

    def subscriber(self) -> Any:
        """What to SUBSCRIBE with: an object whose `pubsub()` is redis.asyncio's. In a cluster, PUBLISH
        reaches every node, so any node will do; each `pubsub()` takes the next known node, so a listener
        that lost its node (and asks again) moves on to another. Its messages also reach the watchers
        (`watch`)."""
        return _WatchedSubscriber(self.client if not self.cluster else _RotatingSubscriber(self), self)

    def _next_node_client(self) -> aioredis.Redis:
        assert isinstance(self.client, aioredis.RedisCluster)
        nodes = self.client.get_nodes() or list(self.client.nodes_manager.startup_nodes.values())
        node = nodes[next(self._sub_nodes) % len(nodes)]
        if node.name not in self._sub_clients:
            kwargs = {k: v for k, v in node.connection_kwargs.items() if k in _PUBSUB_KWARGS}
            self._sub_clients[node.name] = aioredis.Redis(
                host=node.host, port=int(node.port), **_NO_CLIENT_COMMANDS, **kwargs
            )
        return self._sub_clients[node.name]

    async def close(self) -> None:
        """Closes the client and the subscriber connections."""
        for c in self._sub_clients.values():
            with contextlib.suppress(Exception):
                await c.aclose()
        await self.client.aclose()


class _RotatingSubscriber:
    """`pubsub()` on the next cluster node (see Connection.subscriber)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def pubsub(self, **kwargs: Any) -> Any:
        return self._conn._next_node_client().pubsub(**kwargs)


class _WatchedSubscriber:
    """`pubsub()` of `inner` whose messages also reach the connection's watchers (Connection.watch)."""

    def __init__(self, inner: Any, conn: Connection) -> None:
        self._inner = inner
        self._conn = conn

    def pubsub(self, **kwargs: Any) -> Any:
        return _WatchedPubSub(self._inner.pubsub(**kwargs), self._conn._watchers)


class _WatchedPubSub:
    """redis.asyncio's PubSub, with `listen()` and `get_message()` passing each message to the watchers
    first, and telling them when the subscription fails or is made (`on_lost`: messages may have been
    missed)."""

    def __init__(self, inner: Any, watchers: list[tuple[Callable[[bytes | str], None], Callable[[], None]]]):
        self._inner = inner
        self._watchers = watchers

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _seen(self, message: Any) -> None:
        if isinstance(message, dict) and message.get("type") == "message":
            for on_message, _ in self._watchers:
                on_message(message["data"])

    def _lost(self) -> None:
        for _, on_lost in self._watchers:
            on_lost()

    async def subscribe(self, *args: Any, **kwargs: Any) -> Any:
        # Messages published before the subscription took effect were not heard: forget what they
        # might have changed (a first subscription finds nothing to forget).
        reply = await self._inner.subscribe(*args, **kwargs)
        self._lost()
        return reply

    async def listen(self) -> AsyncIterator[Any]:
        try:
            async for message in self._inner.listen():
                self._seen(message)
                yield message
        except (Exception, asyncio.CancelledError):
            self._lost()
            raise

    async def get_message(self, *args: Any, **kwargs: Any) -> Any:
        try:
            message = await self._inner.get_message(*args, **kwargs)
        except (Exception, asyncio.CancelledError):
            self._lost()
            raise
        self._seen(message)
        return message


_RESENDABLE = (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError)
"""Errors after which a script's reply is lost but it may have run: eval_durable sends it again."""

_NO_CLIENT_COMMANDS: dict[str, Any] = {
    "driver_info": None,
    "maint_notifications_config": MaintNotificationsConfig(enabled=False),
}
_PUBSUB_KWARGS = ("username", "password", "socket_connect_timeout", "ssl", "ssl_ca_certs", "ssl_cert_reqs")
