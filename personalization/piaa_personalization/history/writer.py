"""The history writer: drains the Redis outbox into the Delta table, exactly once.

One round (`drain_once`): read up to `per_stream` entries of every non-empty slot stream (XLEN of every
slot: one Lua call on one Redis, a pipeline per node in a cluster every `sweep_s`; then XRANGE of those
with entries), turn them into rows, append them
in ONE Delta commit that also records, per stream, the id of the last entry it holds (history/table.py),
then XDEL them. A crash

- before the commit: nothing is in the table, the entries are still in Redis: the next round writes them;
- after the commit, before the XDEL: the next round finds the entries again, sees that the table's
  recorded id for their stream is at least theirs, writes nothing and deletes them;
- after the XDEL: nothing is left to do.

With replicas (StoreConfig.replica_acks > 0, a Redis Cluster by default) a round reads only what the
replicas hold: after its XRANGEs it writes one mark per node (`<p>:{o:<hex>}:outbox:mark`, the time) and
WAITs for that many replicas on the same connection, which covers every entry the node held before the
mark. Without it, an entry read from a primary that then failed over before replicating it would be in
the table while Redis lost its rating (never acknowledged: its commit refuses), and its seq reused.

Entries of one stream are drained in their order (a stream is append-only, ids grow), so "recorded id >=
entry id" is exactly "already in the table". The commit is made on the table version the progress was
read from, so a second writer (a rolling update's overlap) that drained the same streams meanwhile makes
Delta refuse it ("concurrent transaction": both commits carry a txn of the same app id); its next round
skips what the other wrote. Run one writer per deployment all the same (`piaa-admin history drain`, its
own process, docs/history.md): two only race for the same entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from piaa_personalization.history import outbox
from piaa_personalization.history.table import HistoryTable, Rating, app_id, entry_version
from piaa_personalization.store import backbone
from piaa_personalization.store import format as fmt
from piaa_personalization.store.connection import Script
from piaa_personalization.store.redis_store import RedisProfileStore

log = logging.getLogger(__name__)

# The writer's mark on a node it read from: one write whose replication a WAIT then awaits.
# KEYS: the mark (in a busy stream's slot). ARGV: now.
_MARK = Script("redis.call('SET', KEYS[1], ARGV[1]) return 1")

# One Redis: the non-empty streams among KEYS as {index, length, ...}, in one command (16,384 XLENs in a
# Lua loop take ~30 ms; the same in a pipeline cost the writer ~0.5 s of Python per round).
_LENGTHS = Script(
    "local out = {} for i = 1, #KEYS do local n = redis.call('XLEN', KEYS[i]) "
    "if n > 0 then out[#out + 1] = i - 1; out[#out + 1] = n end end return out"
)


@dataclass
class Batch:
    """What one round read: per stream, the entries (id, fields) in order; and the backlog it saw."""

    entries: dict[str, list[tuple[bytes, dict[bytes, bytes]]]] = field(default_factory=dict)
    backlog: int = 0

    @property
    def size(self) -> int:
        return sum(len(e) for e in self.entries.values())


@dataclass(frozen=True)
class Drained:
    """One round's counts: entries read, rows written, entries skipped as already in the table, and the
    backlog (outbox entries in Redis) before the round."""

    read: int
    written: int
    skipped: int
    backlog: int


class WriterMetrics:
    """The writer's Prometheus metrics (their own registry, as the gateway's core/metrics.py)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.backlog = Gauge(
            "piaa_history_backlog", "Ratings in the Redis outbox not yet in the table", registry=r
        )
        self.rows = Counter("piaa_history_rows", "Rows appended to the history table", registry=r)
        self.skipped = Counter(
            "piaa_history_replayed",
            "Outbox entries found already in the table (a writer crashed before its ack)",
            registry=r,
        )
        self.failures = Counter(
            "piaa_history_failures", "Drain rounds that failed (table or Redis)", registry=r
        )


class HistoryWriter:
    """Drains `store`'s outbox streams into `table` (see the module docstring)."""

    def __init__(
        self,
        store: RedisProfileStore,
        table: HistoryTable,
        *,
        per_stream: int = 500,
        metrics: WriterMetrics | None = None,
        warn_backlog: int = 10_000,
        sweep_s: float = 10.0,
    ) -> None:
        self.store = store
        self.table = table
        self.per_stream = per_stream
        self.metrics = metrics or WriterMetrics()
        self.warn_backlog = warn_backlog
        """A backlog at or above this that grew since the last round is logged as a warning."""
        self.sweep_s = sweep_s
        """Redis Cluster: how often a round looks at every slot's stream (a pipeline of 16,384 XLENs, ~0.5 s
        of Python); the rounds in between look only at the streams the last ones found busy. So a rating in
        a quiet slot waits up to this long (plus a round) before it is drained."""
        self._streams = outbox.all_streams(store.config.key_prefix)
        self._last_backlog = 0
        self._swept = -float("inf")
        self._busy: list[str] = []

    async def read(self) -> Batch:
        """The entries to drain now (at most per_stream from each stream) and the backlog: of every stream
        on one Redis and at a cluster's sweeps, of the streams known busy between them."""
        conn = self.store.conn
        sizes = await self._lengths()
        busy = [k for k, n in sizes.items() if n]
        self._busy = busy
        batch = Batch(backlog=sum(sizes.values()))
        if not busy:
            return batch

        def ranges(pipe: Any) -> None:
            for key in busy:
                pipe.xrange(key, count=self.per_stream)

        found = await conn.pipeline("history_read", busy, ranges)
        batch.entries = {k: list(e) for k, e in zip(busy, found, strict=True) if e}
        await self._replicated(list(batch.entries))
        return batch

    async def _lengths(self) -> dict[str, int]:
        """Stream -> XLEN: of every slot's stream (one Lua call on one Redis; a pipeline per node in a
        cluster, at most every sweep_s), else of the streams busy in the last round."""
        streams = self._streams
        if self.store.config.mode != "cluster":
            flat = await self.store.conn.eval_durable(_LENGTHS, streams, [], acks=0, timeout_ms=1)
            return {streams[int(i)]: int(n) for i, n in zip(flat[::2], flat[1::2], strict=True)}
        now = time.monotonic()
        if now - self._swept >= self.sweep_s:
            self._swept = now
        else:
            streams = self._busy

        def lengths(pipe: Any) -> None:
            for key in streams:
                pipe.xlen(key)

        if not streams:
            return {}
        sizes = await self.store.conn.pipeline("history_backlog", streams, lengths)
        return {k: int(n) for k, n in zip(streams, sizes, strict=True)}

    async def _replicated(self, streams: list[str]) -> None:
        """Returns once the replicas (StoreConfig.replica_acks) hold everything read from `streams`' nodes;
        raises StoreUnavailable when they do not within replica_ack_timeout_ms."""
        acks = self.store.config.replica_acks
        if not acks or not streams:
            return
        per_node: dict[str, str] = {}
        for key in streams:
            node = await self.store.conn.node_of(key)
            per_node.setdefault("" if node is None else node.name, key)
        for key in per_node.values():
            await self.store.conn.eval_durable(
                _MARK, [f"{key}:mark"], [repr(time.time())], acks=acks,
                timeout_ms=self.store.config.replica_ack_timeout_ms,
            )  # fmt: skip

    async def commit(self, batch: Batch) -> tuple[int, int]:
        """Appends the batch's entries not yet in the table, with each stream's progress, in one commit.
        Returns (rows written, entries skipped as already there)."""
        dt = await asyncio.to_thread(lambda: self.table.delta)
        fresh: dict[str, list[tuple[bytes, dict[bytes, bytes]]]] = {}
        skipped = 0
        for key, entries in batch.entries.items():
            recorded = dt.transaction_version(app_id(key))
            done = -1 if recorded is None else recorded
            new = [(i, f) for i, f in entries if entry_version(i) > done]
            skipped += len(entries) - len(new)
            if new:
                fresh[key] = new
        if not fresh:
            return 0, skipped
        records = [(f, fmt.decode_rating(f[b"r"])) for e in fresh.values() for _, f in e]
        features = await self._backbones(sorted({r.digest for _, r in records}))
        rows = [
            Rating(
                tenant=f[b"t"].decode(),
                user=f[b"u"].decode(),
                seq=int(f[b"s"]),
                space=r.fs_version,
                time=r.time,
                value=r.value,
                scale=int(r.scale),
                digest=r.digest,
                outputs=r.outputs.tolist(),
                request_id=f[b"q"].decode() or None,
                backbone=features.get(r.digest),
            )
            for f, r in records
        ]
        progress = {app_id(k): entry_version(e[-1][0]) for k, e in fresh.items()}
        # Committed on the snapshot the progress was read from: a concurrent writer's commit of the same
        # streams since makes Delta refuse this one (the round fails, the next one skips what is there).
        written = await asyncio.to_thread(self.table.append, rows, progress, dt)
        return written, skipped

    async def ack(self, batch: Batch) -> None:
        """Deletes the batch's entries from their streams (after they are in the table)."""
        keys = list(batch.entries)

        def dels(pipe: Any) -> None:
            for key in keys:
                pipe.xdel(key, *[i for i, _ in batch.entries[key]])

        if keys:
            await self.store.conn.pipeline("history_ack", keys, dels)

    async def drain_once(self) -> Drained:
        """One round: read, commit, ack. Raises what Redis or the table raised (the entries stay)."""
        batch = await self.read()
        self.metrics.backlog.set(batch.backlog)
        if batch.backlog >= self.warn_backlog and batch.backlog > self._last_backlog:
            log.warning("history backlog is growing: %d ratings wait in the Redis outbox", batch.backlog)
        self._last_backlog = batch.backlog
        written, skipped = await self.commit(batch)
        await self.ack(batch)
        self.metrics.rows.inc(written)
        self.metrics.skipped.inc(skipped)
        self.metrics.backlog.set(max(0, batch.backlog - batch.size))
        return Drained(batch.size, written, skipped, batch.backlog)

    async def drain(self) -> int:
        """Rounds until the outbox is empty; returns the rows written."""
        total = 0
        while True:
            done = await self.drain_once()
            total += done.written
            if done.read == 0:
                return total

    async def run(self, stop: asyncio.Event, interval_s: float = 1.0, max_backoff_s: float = 30.0) -> None:
        """Drains until `stop` is set: a round, then `interval_s` of rest when the outbox was empty. A
        failing round (the table's storage or Redis down) is logged and retried with a doubling pause up
        to max_backoff_s; its entries stay in Redis (bounded: StoreConfig.history_max_backlog)."""
        pause = interval_s
        while not stop.is_set():
            try:
                done = await self.drain_once()
                pause = interval_s
                rest = interval_s if done.read < self.per_stream else 0.0
            except Exception as err:  # any failure: keep the entries, log, back off
                self.metrics.failures.inc()
                log.error("history drain failed (%s: %s); retrying in %.0f s", type(err).__name__, err, pause)
                rest, pause = pause, min(pause * 2, max_backoff_s)
            if rest:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=rest)

    async def _backbones(self, digests: Sequence[str]) -> dict[str, list[float]]:
        """The stored backbone features of these images (`<p>:bb:...`), decoded; missing ones left out."""
        if not digests:
            return {}
        keys = [backbone.key(self.store.config.key_prefix, d) for d in digests]

        def gets(pipe: Any) -> None:
            for key in keys:
                pipe.get(key)

        raw = await self.store.conn.pipeline("history_backbone", keys, gets)
        return {d: backbone.decode(v).tolist() for d, v in zip(digests, raw, strict=True) if v is not None}
