"""The rating history on a real redis-server (and a real Redis Cluster where marked) and a real local
Delta table in tmp_path: the outbox the append script writes, and the writer that drains it exactly once.

- every acknowledged rating is in the table once, with the request id, the stored head outputs, the
  backbone feature and a per-user seq 0..n-1 (both modes);
- the same entries drained twice (a writer that crashed after its table commit, before deleting them from
  Redis) add no row;
- a retried AddRatings (same request id) and a resent append add no outbox entry;
- a full outbox refuses the rating and writes nothing;
- with history unset, AddRatings writes the keys and runs the commands it did before (no outbox);
- the backlog gauge and the log line while the backlog grows;
- while the table cannot be written, entries wait in Redis (the failure logged and counted) and are
  drained once after it is back;
- the outbox runs under the least-privilege ACL with history's two extra commands, and not without them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import redis

from piaa_personalization.history import outbox
from piaa_personalization.history.table import HistoryTable
from piaa_personalization.history.writer import HistoryWriter
from piaa_personalization.model.residual import FeatureLayout, Prior
from piaa_personalization.store import backbone
from piaa_personalization.store import format as fmt
from piaa_personalization.store.redis_store import (
    RedisProfileStore,
    StoreConfig,
    StoreError,
    StoreUnavailable,
    acl_rules,
)
from tests.integration.test_consistency_store import (
    SleepBeforeFirstWrite,
    impatient,  # noqa: F401 - a fixture used below
    make_records,
    node_address,
)

LAYOUT = FeatureLayout()
PRIOR = Prior.zero(LAYOUT.dim)
TENANT = "acme"


@pytest.fixture
async def hstore(redis_target: tuple[str, str], tmp_path: Path) -> AsyncIterator[RedisProfileStore]:
    """A store with history on (the outbox), once per Redis mode."""
    url, mode = redis_target
    s = RedisProfileStore(StoreConfig(url=url, mode=mode, history_url=str(tmp_path / "history")))
    yield s
    await s.close()


async def backlog(store: RedisProfileStore) -> int:
    """Outbox entries in Redis (XLEN of every slot's stream)."""
    streams = outbox.all_streams(store.config.key_prefix)
    sizes = await store.conn.pipeline("t", streams, lambda p: [p.xlen(k) for k in streams])
    return sum(int(n) for n in sizes)


async def test_each_acknowledged_rating_is_in_the_table_once(
    hstore: RedisProfileStore, tmp_path: Path
) -> None:
    users = [f"user-{i}" for i in range(6)] + ["é:{x}*"]
    given: dict[str, list[fmt.RatingRecord]] = {}
    for k, user in enumerate(users):
        records = make_records(k, 3)
        feature = np.linspace(-1, 1, 1280, dtype=np.float32) * (k + 1)
        await backbone.BackboneStore(hstore.conn, hstore.config.key_prefix).put(
            [records[0].digest], feature[None]
        )
        await hstore.add_ratings(TENANT, user, records[:2], layout=LAYOUT, prior=PRIOR, request_id=f"r{k}")
        await hstore.add_ratings(TENANT, user, records[2:], layout=LAYOUT, prior=PRIOR)
        given[user] = records
    assert await backlog(hstore) == 3 * len(users)

    table = HistoryTable(tmp_path / "history")
    writer = HistoryWriter(hstore, table, per_stream=2)
    assert await writer.drain() == 3 * len(users)
    assert await backlog(hstore) == 0
    assert writer.metrics.registry.get_sample_value("piaa_history_backlog") == 0

    assert table.count(TENANT) == 3 * len(users)
    for k, user in enumerate(users):
        rows = table.user_rows(TENANT, user).to_pylist()
        stored = await hstore.get_ratings(TENANT, user)
        assert [r["seq"] for r in rows] == [0, 1, 2]
        assert [r["digest"] for r in rows] == [s.digest for s in stored]
        assert [r["request_id"] for r in rows] == [f"r{k}", f"r{k}", None]
        assert [r["value"] for r in rows] == [s.value for s in stored]
        assert all(r["space"] == "fs1" and r["scale"] == 1 for r in rows)
        for row, s in zip(rows, stored, strict=True):
            np.testing.assert_array_equal(np.asarray(row["outputs"], np.float32), s.outputs)
            assert row["time"].timestamp() == s.time
        expected = backbone.decode(backbone.encode(np.linspace(-1, 1, 1280, dtype=np.float32) * (k + 1)))
        np.testing.assert_array_equal(np.asarray(rows[0]["backbone"], np.float32), expected)
        assert rows[1]["backbone"] is None
    batches = list(table.iter_ratings(TENANT))
    assert sum(b.num_rows for b in batches) == 3 * len(users)
    assert table.count("other") == 0


async def test_entries_drained_again_after_a_crash_before_the_ack_add_no_row(
    hstore: RedisProfileStore, tmp_path: Path
) -> None:
    for k in range(4):
        await hstore.add_ratings(TENANT, f"u{k}", make_records(k, 2), layout=LAYOUT, prior=PRIOR)
    table = HistoryTable(tmp_path / "history")
    crashed = HistoryWriter(hstore, table)
    batch = await crashed.read()
    assert batch.size == 8
    assert await crashed.commit(batch) == (8, 0)
    # the writer dies here: its rows are in the table, its entries still in Redis
    assert await backlog(hstore) == 8
    await hstore.add_ratings(TENANT, "u0", make_records(9, 1), layout=LAYOUT, prior=PRIOR)

    restarted = HistoryWriter(hstore, HistoryTable(tmp_path / "history"))
    done = await restarted.drain_once()
    assert (done.read, done.written, done.skipped) == (9, 1, 8)
    assert await backlog(hstore) == 0
    assert table.count() == 9
    keys = table.delta.to_pyarrow_table(columns=["user", "seq"])
    assert len({(u, s) for u, s in zip(keys["user"].to_pylist(), keys["seq"].to_pylist(), strict=True)}) == 9
    assert table.user_rows(TENANT, "u0")["seq"].to_pylist() == [0, 1, 2]


async def test_a_retried_add_ratings_adds_no_outbox_entry(hstore: RedisProfileStore, tmp_path: Path) -> None:
    records = make_records(1, 2)
    await hstore.add_ratings(TENANT, "u", records, layout=LAYOUT, prior=PRIOR, request_id="req-1")
    with pytest.raises(fmt.AlreadyRecorded):
        await hstore.add_ratings(TENANT, "u", records, layout=LAYOUT, prior=PRIOR, request_id="req-1")
    assert await backlog(hstore) == 2
    table = HistoryTable(tmp_path / "history")
    await HistoryWriter(hstore, table).drain()
    assert table.count() == 2


async def test_a_resent_append_adds_no_outbox_entry(
    impatient: RedisProfileStore,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    """The append's reply is lost (DEBUG SLEEP, a 0.15 s client timeout) and the append sent again: one
    rating in the list, one entry in the outbox."""
    config = StoreConfig(**{**impatient.config.__dict__, "history_url": str(tmp_path / "h")})
    store = RedisProfileStore(config, client=impatient.client)
    sleeper = SleepBeforeFirstWrite(await node_address(store, store.keys.ratings(TENANT, "u")))
    store.conn.on_round_trip = sleeper
    sleeper.arm()
    await store.add_ratings(TENANT, "u", make_records(3, 1), layout=LAYOUT, prior=PRIOR)
    assert sleeper.finish().startswith(b"+OK")
    assert len(await store.get_ratings(TENANT, "u")) == 1
    assert await backlog(store) == 1


async def test_a_full_outbox_refuses_the_rating_and_writes_nothing(redis_url: str, tmp_path: Path) -> None:
    store = RedisProfileStore(StoreConfig(url=redis_url, history_url=str(tmp_path), history_max_backlog=3))
    try:
        await store.add_ratings(TENANT, "u", make_records(1, 3), layout=LAYOUT, prior=PRIOR)
        with pytest.raises(StoreUnavailable, match="outbox is full"):
            await store.add_ratings(
                TENANT, "u", make_records(2, 1), layout=LAYOUT, prior=PRIOR, request_id="x"
            )
        assert len(await store.get_ratings(TENANT, "u")) == 3
        assert await store.get_receipt(TENANT, "u", "x") is None
        table = HistoryTable(tmp_path / "t")
        await HistoryWriter(store, table).drain()
        await store.add_ratings(TENANT, "u", make_records(2, 1), layout=LAYOUT, prior=PRIOR, request_id="x")
        await HistoryWriter(store, table).drain()
        assert table.user_rows(TENANT, "u")["seq"].to_pylist() == [0, 1, 2, 3]
    finally:
        await store.close()


def _commands(url: str) -> dict[str, int]:
    with redis.Redis.from_url(url) as r:
        return {k.removeprefix("cmdstat_"): v["calls"] for k, v in r.info("commandstats").items()}


async def _keys_after_add(url: str, history_url: str | None) -> tuple[set[bytes], dict[str, int]]:
    with redis.Redis.from_url(url) as r:
        r.flushall()
        r.script_flush()
        r.config_resetstat()
    store = RedisProfileStore(StoreConfig(url=url, history_url=history_url))
    try:
        await store.add_ratings(TENANT, "u", make_records(1, 2), layout=LAYOUT, prior=PRIOR, request_id="q")
        await store.add_ratings(TENANT, "u", make_records(2, 1), layout=LAYOUT, prior=PRIOR)
    finally:
        await store.close()
    with redis.Redis.from_url(url) as r:
        return set(r.keys("*")), _commands(url)


async def test_without_history_add_ratings_writes_what_it_wrote_before(
    redis_url: str, tmp_path: Path
) -> None:
    keys, commands = await _keys_after_add(redis_url, None)
    assert keys == {b"piaa:{t:acme:u:u}:profile", b"piaa:{t:acme:u:u}:ratings", b"piaa:{t:acme:u:u}:req:q"}
    assert "xadd" not in commands and "xlen" not in commands
    with_history, history_commands = await _keys_after_add(redis_url, str(tmp_path))
    stream = outbox.user_stream("piaa", TENANT, "u").encode()
    assert with_history == keys | {stream}
    assert history_commands["xadd"] == 3 and history_commands["xlen"] == 2
    # the same commands otherwise, the same number of times (the scripts differ only by the outbox)
    assert {k: v for k, v in history_commands.items() if k not in ("xadd", "xlen", "config|resetstat")} == {
        k: v for k, v in commands.items() if k != "config|resetstat"
    }


async def test_the_backlog_gauge_and_a_log_line_while_it_grows(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisProfileStore(StoreConfig(url=redis_url, history_url=str(tmp_path)))
    try:
        table = HistoryTable(tmp_path / "t")
        writer = HistoryWriter(store, table, per_stream=1, warn_backlog=3)
        for k in range(4):
            await store.add_ratings(TENANT, "u", make_records(k, 1), layout=LAYOUT, prior=PRIOR)
        with caplog.at_level(logging.WARNING, logger="piaa_personalization.history.writer"):
            first = await writer.drain_once()
        assert (first.backlog, first.written) == (4, 1)
        assert writer.metrics.registry.get_sample_value("piaa_history_backlog") == 3
        assert any("backlog is growing: 4" in r.getMessage() for r in caplog.records)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="piaa_personalization.history.writer"):
            await writer.drain_once()  # 3 left: shrinking, not logged
        assert not caplog.records
        assert pc.sum(table.delta.to_pyarrow_table(columns=["seq"])["seq"]).as_py() == 0 + 1
    finally:
        await store.close()


async def test_while_the_table_cannot_be_written_entries_wait_and_are_drained_after(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The table's storage goes away (its folder replaced by a file): rounds fail, are logged and counted,
    the entries stay in Redis; once it is back, the writer drains them, each once."""
    store = RedisProfileStore(StoreConfig(url=redis_url, history_url=str(tmp_path / "h")))
    try:
        table = HistoryTable(tmp_path / "h")
        writer = HistoryWriter(store, table)
        await store.add_ratings(TENANT, "u", make_records(1, 2), layout=LAYOUT, prior=PRIOR)
        await writer.drain()
        (tmp_path / "h").rename(tmp_path / "away")
        (tmp_path / "h").write_text("the object store is down")
        await store.add_ratings(TENANT, "u", make_records(2, 3), layout=LAYOUT, prior=PRIOR)

        stop = asyncio.Event()
        with caplog.at_level(logging.ERROR, logger="piaa_personalization.history.writer"):
            task = asyncio.create_task(writer.run(stop, interval_s=0.05))
            while writer.metrics.registry.get_sample_value("piaa_history_failures_total", {}) in (None, 0.0):
                await asyncio.sleep(0.05)
            assert await backlog(store) == 3
            (tmp_path / "h").unlink()
            (tmp_path / "away").rename(tmp_path / "h")
            while await backlog(store):
                await asyncio.sleep(0.05)
            stop.set()
            await task
        assert any("history drain failed" in r.getMessage() for r in caplog.records)
        assert HistoryTable(tmp_path / "h").user_rows(TENANT, "u")["seq"].to_pylist() == [0, 1, 2, 3, 4]
    finally:
        await store.close()


async def test_the_outbox_runs_under_the_history_acl(redis_url: str, tmp_path: Path) -> None:
    """A gateway's least-privilege Redis user needs xadd and xlen once history is on:
    acl_rules(history=True) has them, acl_rules() refuses the outbox's append."""
    admin = redis.Redis.from_url(redis_url)
    host = redis_url.split("//")[1].split("/", maxsplit=1)[0]
    try:
        for name, history in (("plain", False), ("hist", True)):
            admin.acl_setuser(name, enabled=True, passwords=["+pw"], reset=True)
            admin.execute_command("ACL", "SETUSER", name, *acl_rules("piaa", history=history))
        plain = RedisProfileStore(StoreConfig(url=f"redis://plain:pw@{host}/0", history_url=str(tmp_path)))
        hist = RedisProfileStore(StoreConfig(url=f"redis://hist:pw@{host}/0", history_url=str(tmp_path)))
        try:
            with pytest.raises(StoreError, match=r"can.t run this command|NOPERM"):
                await plain.add_ratings(TENANT, "u", make_records(1, 1), layout=LAYOUT, prior=PRIOR)
            await hist.add_ratings(TENANT, "u", make_records(1, 1), layout=LAYOUT, prior=PRIOR)
            assert await backlog(hist) == 1
        finally:
            await plain.close()
            await hist.close()
    finally:
        admin.acl_deluser("plain", "hist")
        admin.close()
