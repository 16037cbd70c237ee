"""The history table on the real local filesystem (delta-rs), the outbox's slot tags and script, and the
history settings: no network."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from deltalake.exceptions import CommitFailedError
from redis.crc import key_slot as redis_key_slot

from piaa_personalization.config import GatewayConfig
from piaa_personalization.core import personalizer
from piaa_personalization.history import outbox
from piaa_personalization.history.table import HistoryTable, Rating, app_id, entry_version, user_bucket
from piaa_personalization.store import format as fmt
from piaa_personalization.store.redis_store import _APPEND

T0 = 1_790_000_000.0


def rows(user: str, n: int, start: int = 0, tenant: str = "acme", at: float = T0) -> list[Rating]:
    return [
        Rating(
            tenant, user, start + i, "fs1", at + i, 3.5, 1, f"{i:064x}", [0.25] * 85, f"r{i}", [1.0] * 1280
        )
        for i in range(n)
    ]


def test_an_append_replayed_with_its_progress_adds_nothing(tmp_path: Path) -> None:
    table = HistoryTable(tmp_path / "h")
    stream = app_id("piaa:{o:1}:outbox")
    assert table.progress(stream) is None
    assert table.append(rows("ann", 3), {stream: entry_version("1700000000000-2")}) == 3
    assert table.append(rows("ann", 3), {stream: entry_version("1700000000000-2")}) == 0
    assert table.progress(stream) == entry_version("1700000000000-2")
    assert table.append(rows("ann", 1, start=3), {stream: entry_version("1700000000001-0")}) == 1
    assert HistoryTable(tmp_path / "h").user_rows("acme", "ann")["seq"].to_pylist() == [0, 1, 2, 3]


def test_entry_versions_order_as_stream_ids() -> None:
    ids = ["0-0", "0-1", "1-0", "1700000000000-999999", "1700000000001-0"]
    assert [entry_version(i) for i in ids] == sorted(entry_version(i) for i in ids)
    assert entry_version(b"5-3") == 5_000_003
    with pytest.raises(ValueError):
        entry_version("5-1000000")


def test_readers_find_one_user_and_a_tenant_since_a_time(tmp_path: Path) -> None:
    table = HistoryTable(tmp_path / "h")
    table.append(rows("ann", 2) + rows("bob", 3) + rows("ann", 1, tenant="other"))
    ann = table.user_rows("acme", "ann")
    assert ann.num_rows == 2 and set(ann["tenant"].to_pylist()) == {"acme"}
    assert ann["bucket"].to_pylist() == [user_bucket("ann")] * 2
    assert sum(b.num_rows for b in table.iter_ratings("acme")) == 5
    since = datetime.fromtimestamp(T0 + 1, UTC)
    later = [r for b in table.iter_ratings("acme", since=since) for r in b.to_pylist()]
    assert sorted((r["user"], r["seq"]) for r in later) == [("ann", 1), ("bob", 1), ("bob", 2)]
    assert table.count() == 6 and table.count("other") == 1


def test_delete_user_then_vacuum_leaves_no_file_holding_the_user(tmp_path: Path) -> None:
    table = HistoryTable(tmp_path / "h")
    gone = "o'brien"
    # several commits, so the user's rows are in several files, shared with others of the bucket
    for k in range(3):
        neighbour = next(f"n{i}" for i in range(1000) if user_bucket(f"n{i}") == user_bucket(gone))
        table.append(rows(gone, 2, start=2 * k) + rows(neighbour, 1, start=k) + rows("zed", 1, start=k))
    table.compact()  # the compacted file holds the user too; the old ones stay until vacuum
    assert table.delete_user("acme", gone) == 6
    assert table.user_rows("acme", gone).num_rows == 0

    def users_in_files() -> set[str]:
        found: set[str] = set()
        for path in (tmp_path / "h").rglob("*.parquet"):
            found |= set(pq.read_table(path, columns=["user"])["user"].to_pylist())
        return found

    assert gone in users_in_files()  # deleted from the table, still in old files
    table.vacuum(24)
    assert gone in users_in_files()  # the files are younger than the retention
    assert table.vacuum(0)
    assert gone not in users_in_files()
    assert table.count() == 6 and table.user_rows("acme", "zed").num_rows == 3


def test_rows_round_trip_with_their_types(tmp_path: Path) -> None:
    table = HistoryTable(tmp_path / "h")
    now = float(int(time.time()))
    table.append([Rating("acme", "ü", 0, "fs1", now, 0.75, 2, "ab" * 32, list(range(85)))])
    (row,) = table.user_rows("acme", "ü").to_pylist()
    assert row["time"] == datetime.fromtimestamp(now, UTC) and row["backbone"] is None
    assert row["request_id"] is None and row["scale"] == 2 and row["outputs"] == [float(i) for i in range(85)]


def test_slot_tags_land_in_their_slot() -> None:
    for slot in range(outbox.SLOTS):
        assert redis_key_slot(outbox.stream_key("piaa", slot).encode()) == slot
    tag = fmt.Keys.tag("acme", "a:{b}")
    assert outbox.key_slot(tag) == redis_key_slot(f"piaa:{{{tag}}}:profile".encode())
    assert redis_key_slot(outbox.user_stream("piaa", "acme", "a:{b}").encode()) == outbox.key_slot(tag)


def test_the_outbox_script_is_the_append_script_plus_the_outbox() -> None:
    script = outbox.with_outbox(_APPEND)
    assert script.endswith(_APPEND.split("for i = 7, #ARGV do redis.call('RPUSH'")[1].split("\n", 1)[1])
    assert "XADD" in script and "XADD" not in _APPEND
    with pytest.raises(ValueError, match="RPUSH loop"):
        outbox.with_outbox(_APPEND.replace("RPUSH", "LPUSH"))


def test_history_settings_reach_the_store_and_unset_change_nothing() -> None:
    environ = {"PIAA_REDIS_URL": "redis://127.0.0.1:1/0"}
    on = GatewayConfig.load(["--history-url", "s3://bucket/piaa", "--history-max-backlog", "7"], environ)
    store = asyncio.run(personalizer.connect_store(on)).inner  # connects lazily: no socket opened
    assert (store.config.history_url, store.config.history_max_backlog) == ("s3://bucket/piaa", 7)
    assert store._append_outbox is not None
    off = asyncio.run(personalizer.connect_store(GatewayConfig.load([], environ))).inner
    assert off.config.history_url is None and off._append_outbox is None
    assert GatewayConfig.load([], {"PIAA_HISTORY_URL": "/data/h"}).history_url == "/data/h"
    assert GatewayConfig().history_max_backlog == outbox.DEFAULT_MAX_BACKLOG_PER_SLOT
    with pytest.raises(ValueError, match="history_max_backlog"):
        GatewayConfig(history_max_backlog=0)


def test_a_second_writer_committing_the_same_stream_on_an_older_version_is_refused(tmp_path: Path) -> None:
    """Two writers drained the same outbox entries (B also two newer ones): A commits first; B, whose
    progress was read before A's commit, is refused by Delta rather than adding A's rows again."""
    table = HistoryTable(tmp_path / "h")
    stream = app_id("piaa:{o:1}:outbox")
    b_snapshot = HistoryTable(tmp_path / "h").delta  # B read the progress here (none yet)
    assert table.append(rows("ann", 3), {stream: entry_version("10-0")}) == 3  # A
    with pytest.raises(CommitFailedError, match=r"(?i)concurrent transaction"):
        table.append(rows("ann", 5), {stream: entry_version("12-0")}, snapshot=b_snapshot)
    assert table.user_rows("acme", "ann")["seq"].to_pylist() == [0, 1, 2]
    # B's next round reads the progress anew and writes only the newer entries
    assert table.append(rows("ann", 2, start=3), {stream: entry_version("12-0")}) == 2
    assert table.user_rows("acme", "ann")["seq"].to_pylist() == [0, 1, 2, 3, 4]
