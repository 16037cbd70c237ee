"""The rating history: one Delta Lake table (delta-rs, no JVM) holding every acknowledged rating.

Redis keeps what serving needs; this table keeps the history that rebuilds, migrations and population
learning read (docs/history.md). Any engine that reads Delta (Spark, DuckDB, Polars, Ray, Trino) reads it.

The table is partitioned by `tenant` and `bucket` (`user_bucket(user)`: CRC-32 of the UTF-8 user id
mod `BUCKETS`), so one user's rows are in one partition folder, and a tenant's are in `BUCKETS` of them.

Exactly once. `append(rows, progress=...)` commits the rows and, in the same Delta commit, one
application transaction (Delta's `txn` action: app id -> version) per outbox stream the rows came from,
version = the last stream entry id they include (`entry_version`). The commit is atomic: either the rows
and the progress are in the table, or neither is. A writer that crashes after the commit and before it
trimmed its outbox reads its progress back (`progress(app_id)`) and skips entries up to it, so nothing is
added twice; a writer that crashes before the commit drains the same entries again. MERGE on
(tenant, user, seq) would also work, but it reads the target partitions on every batch and, after an
erasure, could not tell an old entry replayed from a new one; the transaction version costs nothing to
check and follows the outbox's own order. `seq` (the rating's position in the user's history) still makes
a duplicate detectable by any reader: (tenant, user, seq) is unique.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
from deltalake import CommitProperties, DeltaTable, Transaction, WriterProperties, write_deltalake
from deltalake.exceptions import TableNotFoundError

BUCKETS = 64
"""Hash buckets of users per tenant (the second partition column): part of the table's contract, a
reader computes `user_bucket` with it (changing it means rewriting the table)."""

PARTITIONS = ["tenant", "bucket"]

SCHEMA = pa.schema(
    [
        pa.field("tenant", pa.string(), nullable=False),
        pa.field("bucket", pa.int32(), nullable=False),
        pa.field("user", pa.string(), nullable=False),
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("space", pa.string(), nullable=False),
        pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("request_id", pa.string(), nullable=True),
        pa.field("value", pa.float32(), nullable=False),
        pa.field("scale", pa.int8(), nullable=False),
        pa.field("digest", pa.string(), nullable=False),
        pa.field("outputs", pa.list_(pa.float32()), nullable=False),
        pa.field("backbone", pa.list_(pa.float32()), nullable=True),
    ]
)
"""One row per acknowledged rating:

- tenant, user: who rated; bucket: `user_bucket(user)` (partition column)
- seq: the rating's 0-based position in the user's history (the Redis ratings list's index at its
  append); (tenant, user, seq) is unique
- space: the feature space of `outputs` (e.g. fs1)
- time: when the rating was given (whole seconds, as Redis records it)
- request_id: the AddRatings request id, when the caller gave one
- value, scale: the rating as given (scale 1 = stars 1-5, 2 = unit [0, 1]: piaa.v1.RatingScale)
- digest: hex SHA-256 of the image file
- outputs: the image's 85 head outputs as Redis stores them (quantized, decoded: a rebuild from the
  table folds exactly what a refit from Redis folds)
- backbone: the image's pooled backbone feature (1280 floats, 8-bit quantized, decoded), or null when
  the image was rated without its bytes (Delta has no float16 type)
"""

_APP_PREFIX = "piaa-outbox"

_WRITER = WriterProperties(compression="ZSTD")
"""zstd: 5 % smaller than delta-rs's default snappy on realistic rows (history/sizing.py)."""


def user_bucket(user: str, buckets: int = BUCKETS) -> int:
    """The partition bucket of a user id (stable across processes and engines: CRC-32 of its UTF-8)."""
    return zlib.crc32(user.encode()) % buckets


def entry_version(entry_id: str | bytes) -> int:
    """A Redis stream entry id `<ms>-<seq>` as one int64 that orders like it (the Delta txn version)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    if int(seq) >= 1_000_000:
        raise ValueError(f"stream entry {text}: more than 10^6 entries in one millisecond")
    return int(ms) * 1_000_000 + int(seq)


def app_id(stream_key: str) -> str:
    """The Delta application id that records how far the outbox stream `stream_key` was drained."""
    return f"{_APP_PREFIX}:{stream_key}"


@dataclass(frozen=True)
class Rating:
    """One row of the table (see SCHEMA)."""

    tenant: str
    user: str
    seq: int
    space: str
    time: float
    value: float
    scale: int
    digest: str
    outputs: Sequence[float]
    request_id: str | None = None
    backbone: Sequence[float] | None = None


def to_arrow(rows: Sequence[Rating], buckets: int = BUCKETS) -> pa.Table:
    """The rows as an Arrow table of SCHEMA."""
    return pa.Table.from_pylist(
        [
            {
                "tenant": r.tenant,
                "bucket": user_bucket(r.user, buckets),
                "user": r.user,
                "seq": r.seq,
                "space": r.space,
                "time": datetime.fromtimestamp(r.time, UTC),
                "request_id": r.request_id,
                "value": r.value,
                "scale": r.scale,
                "digest": r.digest,
                "outputs": list(map(float, r.outputs)),
                "backbone": None if r.backbone is None else list(map(float, r.backbone)),
            }
            for r in rows
        ],
        schema=SCHEMA,
    )


def _quote(text: str) -> str:
    """A SQL string literal (the predicates of delete)."""
    return "'" + text.replace("'", "''") + "'"


class HistoryTable:
    """The history table at a URL: a local folder (a path or file://) or object storage (s3://, gs://,
    abfss://, with `storage_options` passed to delta-rs as they are). Created on first open."""

    def __init__(self, url: str | Path, storage_options: Mapping[str, str] | None = None) -> None:
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        if "://" not in self.url:
            Path(self.url).mkdir(parents=True, exist_ok=True)
        try:
            self._dt = DeltaTable(self.url, storage_options=self.storage_options or None)
        except TableNotFoundError:
            self._dt = DeltaTable.create(
                self.url,
                SCHEMA,
                mode="ignore",
                partition_by=PARTITIONS,
                name="piaa_ratings",
                description="every acknowledged PIAA rating (docs/history.md)",
                storage_options=self.storage_options or None,
            )
        self.buckets = BUCKETS

    @property
    def delta(self) -> DeltaTable:
        """The delta-rs table, brought up to the latest version."""
        self._dt.update_incremental()
        return self._dt

    # -- writing ------------------------------------------------------------------------------------

    def progress(self, app: str) -> int | None:
        """The last version committed under application id `app` (entry_version of an outbox entry)."""
        return self.delta.transaction_version(app)

    def append(
        self,
        rows: Sequence[Rating] | pa.Table,
        progress: Mapping[str, int] | None = None,
        snapshot: DeltaTable | None = None,
    ) -> int:
        """Appends rows in one atomic commit that also records `progress` (app id -> version, Delta txn
        actions). Returns the rows written. Idempotent under replays: when every app id's recorded
        version is already >= the given one, nothing is written (the rows were committed before).

        `snapshot`: the table version the caller chose the rows against (its progress read there); the
        commit is made on it, so when another writer committed progress for the same app id since, Delta
        refuses this commit (CommitFailedError, "concurrent transaction") instead of adding its rows twice.
        Default: the latest version."""
        table = rows if isinstance(rows, pa.Table) else to_arrow(rows, self.buckets)
        progress = dict(progress or {})
        dt = self.delta if snapshot is None else snapshot
        if progress and all((dt.transaction_version(a) or -1) >= v for a, v in progress.items()):
            return 0  # (a recorded version is an entry id, never 0: `or -1` only maps None)
        txns = [Transaction(a, v) for a, v in progress.items()]
        if table.num_rows == 0 and not txns:
            return 0
        write_deltalake(
            dt,
            table,
            mode="append",
            partition_by=PARTITIONS,
            storage_options=self.storage_options or None,
            writer_properties=_WRITER,
            commit_properties=CommitProperties(app_transactions=txns or None),
        )
        return table.num_rows

    def delete_user(self, tenant: str, user: str, progress: Mapping[str, int] | None = None) -> int:
        """Removes every row of one user (a new table version; the files that held them stay until
        `vacuum`). Records `progress` in the same commit. Returns the rows removed."""
        pred = (
            f"tenant = {_quote(tenant)} AND bucket = {user_bucket(user, self.buckets)} "
            f'AND "user" = {_quote(user)}'
        )
        txns = [Transaction(a, v) for a, v in (progress or {}).items()]
        metrics = self.delta.delete(pred, commit_properties=CommitProperties(app_transactions=txns or None))
        return int(metrics.get("num_deleted_rows", 0))

    def vacuum(self, retention_hours: float = 24.0) -> list[str]:
        """Deletes the files no table version newer than `retention_hours` refers to (those that held
        deleted or compacted rows); returns their paths. 0 removes every file the current version does
        not use (readers of older versions then fail: docs/history.md)."""
        return list(
            self.delta.vacuum(
                retention_hours=int(retention_hours), dry_run=False, enforce_retention_duration=False
            )
        )

    def compact(self, tenant: str | None = None) -> dict[str, Any]:
        """Rewrites small files into large ones (optimize), for one tenant or all; returns delta-rs's
        metrics. The old files stay until `vacuum`."""
        parts = [("tenant", "=", tenant)] if tenant else None
        return dict(self.delta.optimize.compact(partition_filters=parts))

    # -- reading ------------------------------------------------------------------------------------

    def _dataset(self, tenant: str, bucket: int | None = None) -> pads.Dataset:
        parts: list[tuple[str, str, Any]] = [("tenant", "=", tenant)]
        if bucket is not None:
            parts.append(("bucket", "=", str(bucket)))
        return self.delta.to_pyarrow_dataset(partitions=parts)

    def user_rows(self, tenant: str, user: str) -> pa.Table:
        """Every row of one user, in `seq` order (one partition read)."""
        ds = self._dataset(tenant, user_bucket(user, self.buckets))
        table = ds.to_table(filter=pads.field("user") == user)
        return table.sort_by("seq")

    def iter_ratings(
        self, tenant: str, since: datetime | None = None, batch_size: int = 65_536
    ) -> Iterator[pa.RecordBatch]:
        """A tenant's rows (optionally those rated at or after `since`) as Arrow record batches, in no
        particular order: what population learning and migrations stream through."""
        ds = self._dataset(tenant)
        flt = None if since is None else pads.field("time") >= pa.scalar(since, pa.timestamp("us", "UTC"))
        yield from ds.to_batches(filter=flt, batch_size=batch_size)

    def count(self, tenant: str | None = None) -> int:
        """Rows in the table (or of one tenant)."""
        if tenant is None:
            return int(self.delta.to_pyarrow_dataset().count_rows())
        return int(self._dataset(tenant).count_rows())

    def files(self) -> list[str]:
        """The data files the current version uses (URIs)."""
        return list(self.delta.file_uris())
