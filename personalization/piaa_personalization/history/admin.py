"""`piaa-admin history ...`: drain the outbox into the table, vacuum, compact (the CLI only parses flags).

piaa-admin history drain [--once] [--metrics-port 9109]   # the writer: one per deployment
piaa-admin history vacuum [--retention-hours 24]          # delete files no recent version uses
piaa-admin history compact [--tenant T]                   # rewrite small files into large ones
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Mapping
from typing import TYPE_CHECKING

from piaa_personalization.store.redis_store import RedisProfileStore

if TYPE_CHECKING:
    from piaa_personalization.history.table import HistoryTable

ENV_URL = "PIAA_HISTORY_URL"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], environ: Mapping[str, str]) -> None:
    """Adds `history` and its commands to piaa-admin's subparsers."""
    h = sub.add_parser("history", help="the rating history table (docs/history.md)")
    h.add_argument(
        "--history-url",
        default=environ.get(ENV_URL, ""),
        help=f"the table: a folder or s3://, gs://, abfss:// [env {ENV_URL}]",
    )
    h.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed to delta-rs's object store (e.g. AWS_REGION=eu-west-1); repeatable",
    )
    hs = h.add_subparsers(dest="history_command", required=True)
    d = hs.add_parser("drain", help="append the Redis outbox to the table, exactly once")
    d.add_argument("--once", action="store_true", help="drain until the outbox is empty, then exit")
    d.add_argument("--interval-s", type=float, default=1.0, help="rest between rounds when idle")
    d.add_argument("--per-stream", type=int, default=500, help="entries read per slot stream per round")
    d.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: none)")
    v = hs.add_parser("vacuum", help="delete the files no table version newer than the retention uses")
    v.add_argument("--retention-hours", type=float, default=24.0, help="0 forces out every old file")
    c = hs.add_parser("compact", help="rewrite small files into large ones")
    c.add_argument("--tenant", default=None)


def open_table(args: argparse.Namespace) -> HistoryTable:
    """The table the flags name; SystemExit without one. (deltalake and pyarrow are imported here, not
    with piaa-admin: its other commands run where they are not installed, e.g. the gateway image.)"""
    from piaa_personalization.history.table import HistoryTable

    if not args.history_url:
        raise SystemExit(f"piaa-admin history: --history-url (or {ENV_URL}) is required")
    options = dict(o.split("=", 1) for o in args.storage_option)
    return HistoryTable(args.history_url, options)


async def run(store: RedisProfileStore, args: argparse.Namespace) -> int:
    """Runs one `history` command; returns its exit status."""
    table = open_table(args)
    if args.history_command == "vacuum":
        removed = await asyncio.to_thread(table.vacuum, args.retention_hours)
        print(f"vacuum: {len(removed)} files deleted")
        return 0
    if args.history_command == "compact":
        metrics = await asyncio.to_thread(table.compact, args.tenant)
        print(f"compact: {metrics.get('numFilesRemoved', 0)} files into {metrics.get('numFilesAdded', 0)}")
        return 0
    from piaa_personalization.history.writer import HistoryWriter

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    writer = HistoryWriter(store, table, per_stream=args.per_stream)
    if args.once:
        print(f"drain: {await writer.drain()} rows appended")
        return 0
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, registry=writer.metrics.registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"history {table.url}", flush=True)
    await writer.run(stop, interval_s=args.interval_s)
    return 0
