"""The rating history through the live product: a real gateway (with --history-url), real Triton and
redis-server, real gRPC; the writer and the vacuum run as the `piaa-admin history` commands an operator
runs; the table is read back with deltalake and pyarrow as any engine would read it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from piaa_client import Client
from piaa_client.types import Rating
from piaa_personalization.history.table import HistoryTable
from piaa_triton.server import TritonServer
from tests.fixtures.gateway import REPO_ROOT, GatewayProcess, start_gateway
from tests.fixtures.photos import Photo


@pytest.fixture
def history_gateway(
    triton_server: TritonServer, redis_url: str, tmp_path: Path
) -> Iterator[tuple[GatewayProcess, str, Path]]:
    """A gateway writing the history outbox for the table in tmp_path/history."""
    table = tmp_path / "history"
    process = start_gateway(redis_url, triton_server.grpc_url, "--history-url", str(table))
    try:
        yield process, redis_url, table
    finally:
        process.stop()


def admin(*args: str) -> str:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from piaa_personalization.admin.cli import main; sys.exit(main())",
            *args,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_acknowledged_ratings_reach_the_table_once_and_a_vacuumed_user_is_in_no_file(
    history_gateway: tuple[GatewayProcess, str, Path], photos: list[Photo]
) -> None:
    gateway, redis_url, table_dir = history_gateway
    users = ["ann", "bob", "c:{d}"]
    with Client(gateway.address, timeout=60) as client:
        for k, user in enumerate(users):
            ratings = [Rating(photos[k + i].path, 1.0 + i) for i in range(3)]
            first = client.add_ratings(user, ratings, request_id=f"req-{k}")
            again = client.add_ratings(user, ratings, request_id=f"req-{k}")  # a retry: nothing recorded
            assert not first.replayed and again.replayed
            client.add_ratings(user, [Rating(photos[k].path, 5.0)])

    out = admin("--redis-url", redis_url, "history", "--history-url", str(table_dir), "drain", "--once")
    assert "12 rows appended" in out
    rows = DeltaTable(str(table_dir)).to_pyarrow_table().to_pylist()
    assert len(rows) == 12
    assert len({(r["user"], r["seq"]) for r in rows}) == 12
    for k, user in enumerate(users):
        mine = sorted((r for r in rows if r["user"] == user), key=lambda r: r["seq"])
        assert [r["seq"] for r in mine] == [0, 1, 2, 3]
        assert [r["value"] for r in mine] == [1.0, 2.0, 3.0, 5.0]
        assert [r["request_id"] for r in mine[:3]] == [f"req-{k}"] * 3 and mine[3]["request_id"]
        assert all(len(r["outputs"]) == 85 and len(r["backbone"]) == 1280 for r in mine)
    # drained again: nothing left, nothing added
    out = admin("--redis-url", redis_url, "history", "--history-url", str(table_dir), "drain", "--once")
    assert "0 rows appended" in out

    # erasure (the table side; DeleteProfile is wired to it in the next step, docs/history.md)
    assert HistoryTable(table_dir).delete_user("default", "c:{d}") == 4
    admin("history", "--history-url", str(table_dir), "vacuum", "--retention-hours", "0")
    users_in_files: set[str] = set()
    for path in table_dir.rglob("*.parquet"):
        users_in_files |= set(pq.read_table(path, columns=["user"])["user"].to_pylist())
    assert users_in_files == {"ann", "bob"}
