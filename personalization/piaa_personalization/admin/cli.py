"""`piaa-admin`: move profiles into a new feature space, switch the gateways, re-enrol images.

    piaa-admin migrate --to fs2 --dry-run            # how many users and ratings would move
    piaa-admin migrate --to fs2 --switch             # migrate, catch up, switch every gateway, catch up
    piaa-admin switch --to fs1                       # roll back (or forward) without migrating
    piaa-admin status                                # the rollout state and a migration's saved cursors
    piaa-admin reenrol --to fs2 --folder DIR         # images for ratings without a backbone feature
    piaa-admin history drain|vacuum|compact          # the rating history table (docs/history.md)

Connection flags: --redis-url, --redis-mode, --key-prefix, --triton-url, --triton-model (the gateway's).
Runbook: docs/operations.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from piaa_client.features import BACKBONE_FEATURE, HEAD_OUTPUTS
from piaa_personalization.core.spaces import ServedSpace, check_config, ensemble_for
from piaa_personalization.core.triton_client import TritonClient
from piaa_personalization.history import admin as history_admin
from piaa_personalization.model.residual import HeadOutputs
from piaa_personalization.store import format as fmt
from piaa_personalization.store import rollout
from piaa_personalization.store.backbone import BackboneStore
from piaa_personalization.store.migration import Counts, Interrupted, Migration, Plan
from piaa_personalization.store.redis_store import RedisProfileStore, StoreConfig

MAX_CATCH_UP_PASSES = 5
"""Catch-up passes before giving up on a quiet moment (each rebuilds only users who rated meanwhile)."""


def _pack(outputs: dict[str, np.ndarray]) -> NDArray[np.float32]:
    return np.concatenate(
        [np.asarray(outputs[o.name], np.float32).reshape(len(outputs[o.name]), -1) for o in HEAD_OUTPUTS],
        axis=1,
    )


async def served(triton: TritonClient, default_model: str, space: str) -> ServedSpace:
    """The ensemble serving `space` (the default model, or `<default>_<space>` beside it).
    Raises UnservableSpace / TritonUnavailable."""
    default = check_config(default_model, await triton.model_config(default_model))
    if default.feature_space == space:
        return default
    name = ensemble_for(default_model, space)
    found = check_config(name, await triton.model_config(name))
    if found.feature_space != space:
        raise SystemExit(f"piaa-admin: Triton model {name!r} serves {found.feature_space!r}, not {space!r}")
    return found


class _Bar:
    """A progress line on stderr: users done of the total, migrated, rate."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done, self.migrated = total, label, 0, 0
        self.started = time.monotonic()

    def __call__(self, counts: Counts) -> None:
        self.done += counts.users
        self.migrated += counts.migrated
        width = 30
        filled = int(width * min(1.0, self.done / self.total)) if self.total else width
        rate = self.done / max(1e-9, time.monotonic() - self.started)
        sys.stderr.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} users, "
            f"{self.migrated} written, {rate:.0f} users/s"
        )
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


async def migrate(store: RedisProfileStore, triton: TritonClient, args: argparse.Namespace) -> int:
    """The `migrate` command; returns the exit status."""
    state = await rollout.read(store)
    default = check_config(args.triton_model, await triton.model_config(args.triton_model))
    source = args.source or state.active or default.feature_space
    target = await served(triton, args.triton_model, args.to)

    async def heads(features: NDArray[np.float32]) -> NDArray[np.float32]:
        return _pack(await triton.heads(target.heads, features))

    plan = Plan(source, args.to, args.with_embedding, args.batch, args.rate)
    job = Migration(store, plan, heads)
    users, ratings = await job.count()
    print(f"{users} users with {ratings} ratings in {source}; target {args.to} (heads model {target.heads})")
    if args.dry_run:
        print(f"dry run: would move {users} users and {ratings} ratings from {source} to {args.to}")
        return 0
    if args.restart:
        await job.reset()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, lambda: setattr(job, "stop_requested", True))
    started = time.monotonic()
    total = Counts()
    try:
        total.add(await _pass(job, users, "migrate", resume=True))
        learned = await job.learn_priors(await job.tenants())
        if learned:
            print(f"learned the {args.to} prior of {len(learned)} tenant(s); refitting with it")
            total.add(await _pass(job, users, "refit", force=True))
        for n in range(MAX_CATCH_UP_PASSES):
            caught = await _pass(job, users, f"catch-up {n + 1}")
            total.add(caught)
            if caught.migrated == 0:
                break
        if args.switch:
            after = await rollout.switch(store, args.to, also=(source,))
            print(f"switched: gateways serve {after.active} (previous {after.previous}) within their poll")
            await asyncio.sleep(args.settle_s)
            for n in range(MAX_CATCH_UP_PASSES):
                caught = await _pass(job, users, f"after switch {n + 1}")
                total.add(caught)
                if caught.migrated == 0:
                    break
    except Interrupted as stop:
        print(f"interrupted ({stop}); run the same command again to resume")
        return 130
    seconds = time.monotonic() - started
    missing = len(total.digests_without_backbone)
    print(
        f"migrated {total.migrated} profile writes ({total.ratings} ratings folded), {source} -> {args.to}, "
        f"in {seconds:.1f} s; {total.heads_computed} images re-scored from stored backbone features; "
        f"{total.without_features} ratings of {missing} images without features "
        f"({'piaa-admin reenrol to add them' if missing else 'none'})"
    )
    return 0


async def _pass(job: Migration, total_users: int, label: str, **kwargs: Any) -> Counts:
    bar = _Bar(total_users, label)
    try:
        return await job.run_pass(on_batch=bar, **kwargs)
    finally:
        bar.close()


async def reenrol(store: RedisProfileStore, triton: TritonClient, args: argparse.Namespace) -> int:
    """The `reenrol` command: image files whose digest was rated and lacks a backbone feature (or all
    rated ones with --all, after a backbone change) run through the target space's ensemble; their
    backbone feature and target head outputs are stored. Then run `migrate` again."""
    target = await served(triton, args.triton_model, args.to)
    files = sorted(p for p in Path(args.folder).rglob("*") if p.is_file()) if args.folder else []
    if args.files:
        files += [Path(line.strip()) for line in Path(args.files).read_text().splitlines() if line.strip()]
    rated = await _rated_digests(store)
    backbones = BackboneStore(store.conn, store.config.key_prefix)
    wanted = rated if args.all else set(await backbones.missing(sorted(rated)))
    by_digest: dict[str, Path] = {}
    for path in files:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in wanted:
            by_digest.setdefault(digest, path)
    names = sorted(by_digest)
    for start in range(0, len(names), 16):
        chunk = names[start : start + 16]
        result = await triton.infer(
            [by_digest[d].read_bytes() for d in chunk],
            model=f"{args.triton_model}_backbone",
            outputs=(BACKBONE_FEATURE,),
        )
        good = [i for i in range(len(chunk)) if i not in result.errors]
        features = result.outputs[BACKBONE_FEATURE.name][good]
        await backbones.put([chunk[i] for i in good], features)
        packed = _pack(await triton.heads(target.heads, features))
        await store.put_features([chunk[i] for i in good], HeadOutputs.from_packed(packed), args.to)
    print(
        f"re-enrolled {len(names)} of {len(wanted)} rated images that needed it "
        f"({len(wanted) - len(names)} not found among {len(files)} files); now run piaa-admin migrate"
    )
    return 0


async def _rated_digests(store: RedisProfileStore) -> set[str]:
    """Every digest in any ratings list (SCAN of every primary)."""
    digests: set[str] = set()
    pattern = f"{store.config.key_prefix}:{{t:*:u:*}}:ratings"
    async for keys in store.conn.scan(pattern, 500):
        for key in keys:
            async with store.conn.guard():
                raw = await store.client.lrange(key.decode(), 0, -1)
            digests.update(fmt.decode_rating(r if isinstance(r, bytes) else r.encode()).digest for r in raw)
    return digests


async def _run(args: argparse.Namespace) -> int:
    store = RedisProfileStore(
        StoreConfig(url=args.redis_url, mode=args.redis_mode, key_prefix=args.key_prefix)
    )
    if args.command == "history":
        try:
            return await history_admin.run(store, args)
        finally:
            await store.close()
    triton = TritonClient(args.triton_url, args.triton_model)
    try:
        if args.command == "migrate":
            return await migrate(store, triton, args)
        if args.command == "reenrol":
            return await reenrol(store, triton, args)
        if args.command == "switch":
            await served(triton, args.triton_model, args.to)  # refuse a space Triton does not serve
            state = await rollout.switch(store, args.to)
            print(
                f"switched: gateways serve {state.active} (previous {state.previous}); spaces {state.spaces}"
            )
            return 0
        state = await rollout.read(store)
        print(
            f"active: {state.active or '(never switched)'}, previous: {state.previous}, "
            f"spaces: {', '.join(state.spaces)}"
        )
        return 0
    finally:
        await triton.close()
        await store.close()


def parser() -> argparse.ArgumentParser:
    """The flags of every command."""
    p = argparse.ArgumentParser(
        prog="piaa-admin", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--redis-mode", choices=("standalone", "cluster"), default="standalone")
    p.add_argument("--key-prefix", default="piaa")
    p.add_argument("--triton-url", default="127.0.0.1:8001")
    p.add_argument("--triton-model", default="piaa", help="the gateways' default ensemble")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("migrate", help="move every profile into feature space --to")
    m.add_argument("--to", required=True)
    m.add_argument("--from", dest="source", default=None, help="default: the active space")
    m.add_argument("--dry-run", action="store_true", help="count the users and ratings that would move")
    m.add_argument("--switch", action="store_true", help="switch the gateways once caught up")
    m.add_argument("--batch", type=int, default=200, help="users per batch")
    m.add_argument("--rate", type=float, default=0.0, help="at most this many users per second (0: no limit)")
    m.add_argument(
        "--settle-s", type=float, default=3.0, help="wait after the switch before the last catch-up"
    )
    m.add_argument("--restart", action="store_true", help="forget saved cursors; start from the beginning")
    m.add_argument("--with-embedding", action="store_true", help="the gateways personalize on the embedding")
    s = sub.add_parser("switch", help="make the gateways serve feature space --to (roll forward or back)")
    s.add_argument("--to", required=True)
    sub.add_parser("status", help="print the rollout state")
    r = sub.add_parser("reenrol", help="store backbone features of rated images from their files")
    r.add_argument("--to", required=True, help="the feature space to store head outputs in")
    r.add_argument("--folder", default=None)
    r.add_argument("--files", default=None, help="a text file with one image path per line")
    r.add_argument("--all", action="store_true", help="every rated image, not only those without a feature")
    history_admin.add_parser(sub, os.environ)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns its exit status."""
    args = parser().parse_args(argv)
    return asyncio.run(_run(args))
