"""`piaa`: the command line over the Python client. It parses flags, reads files and prints; nothing else."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from piaa_client import report
from piaa_client.client import Client
from piaa_client.defaults import DEFAULT_TARGET
from piaa_client.errors import PiaaError, Unavailable
from piaa_client.types import ImageScore, Rating, Scale

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
CHUNK = 32
"""Images per request when a directory is sent in pieces."""

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_SERVER = 4
EXIT_PARTIAL = 5
"""`score` and `rank` scored the images they could; those they could not are listed on stderr."""


class CliError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""


def _images(paths: Sequence[str]) -> list[Path]:
    """Files as given, and the images inside any directory (sorted); unreadable files fail here."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise CliError(f"no such file or directory: {raw}")
    for path in found:
        if not os.access(path, os.R_OK):
            raise CliError(f"cannot read {path}")
    if not found:
        raise CliError(f"no images (JPEG, PNG, WebP) in {' '.join(paths)}")
    return found


def _chunks(items: list[Path], quiet: bool) -> Iterator[list[Path]]:
    """Yields CHUNK-sized pieces, drawing a progress bar on stderr when there is more than one."""
    total = len(items)
    for start in range(0, total, CHUNK):
        yield items[start : start + CHUNK]
        if total > CHUNK and not quiet:
            done = min(start + CHUNK, total)
            bar = "#" * (30 * done // total)
            print(f"\r[{bar:<30}] {done}/{total} images", end="", file=sys.stderr, flush=True)
    if total > CHUNK and not quiet:
        print(file=sys.stderr)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def _score_rows(scores: list[ImageScore], names: dict[str, str]) -> list[list[str]]:
    return [
        [
            names.get(s.digest, s.id),
            f"{s.score:.3f}",
            f"{s.generic_score:.3f}",
            "yes" if s.personalized else f"no ({s.fallback_reason})",
        ]
        for s in scores
    ]


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else text)


def _report_failures(failed: list[ImageScore], total: int) -> int:
    """Lists the images that could not be scored on stderr; the exit code: EXIT_PARTIAL if any, else 0."""
    if not failed:
        return 0
    print(f"piaa: could not score {len(failed)} of {total} images:", file=sys.stderr)
    for s in failed:
        assert s.error is not None
        print(f"  {s.id or s.digest}: {s.error.code}: {s.error.message}", file=sys.stderr)
    return EXIT_PARTIAL


def cmd_score(client: Client, args: argparse.Namespace) -> int:
    paths = _images(args.paths)
    partial = not args.strict
    results = [
        s
        for chunk in _chunks(paths, args.json)
        for s in client.score(args.user, chunk, allow_partial=partial)
    ]
    scores = [s for s in results if s.error is None]
    _emit(
        args,
        [asdict(s) for s in results],
        _table(_score_rows(scores, {}), ["image", "score", "generic", "personalized"]),
    )
    return _report_failures([s for s in results if s.error is not None], len(results))


def rank_directory(
    client: Client, user: str, paths: list[Path], quiet: bool, allow_partial: bool = False
) -> list[ImageScore]:
    """The whole album ranked by the user's taste, best first (sent in pieces, merged here), then, with
    allow_partial, the images that could not be scored (`error` set) in file order; without it a bad
    image raises InvalidRequest."""
    results = [
        s
        for chunk in _chunks(paths, quiet)
        for s in client.rank_album(user, chunk, allow_partial=allow_partial)
    ]
    ranked = sorted((s for s in results if s.error is None), key=lambda s: s.score, reverse=True)
    return ranked + [s for s in results if s.error is not None]


def cmd_rank(client: Client, args: argparse.Namespace) -> int:
    paths = _images([args.directory])
    results = rank_directory(client, args.user, paths, args.json, allow_partial=not args.strict)
    ranked = [s for s in results if s.error is None]
    failed = [s for s in results if s.error is not None]
    top = ranked[: args.top] if args.top else ranked
    if args.html:
        by_name = {p.name: p for p in paths}
        ratings = _read_ratings(Path(args.ratings), args.scale) if args.ratings else []
        known = {Path(str(r.image)).name: r for r in ratings}
        html = report.album_report(
            args.user,
            top,
            {s.id: by_name[s.id].read_bytes() for s in top if s.id in by_name},
            client.get_profile(args.user),
            {name: report.unit_value(r.value, r.scale) for name, r in known.items()},
            failed=failed,
        )
        Path(args.html).write_text(html, encoding="utf-8")
    rows = [[str(i + 1), *row] for i, row in enumerate(_score_rows(top, {}))]
    text = _table(rows, ["rank", "image", "score", "generic", "personalized"])
    if args.html:
        text += f"\n\nreport written to {args.html}"
    _emit(args, [asdict(s) for s in [*top, *failed]], text)
    return _report_failures(failed, len(ranked) + len(failed))


def _read_ratings(csv_path: Path, scale: Scale) -> list[Rating]:
    """Reads `path,rating` rows; paths are relative to the CSV's folder."""
    try:
        with csv_path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise CliError(f"cannot read {csv_path}: {err.strerror}") from None
    if not rows or not {"path", "rating"} <= set(rows[0]):
        raise CliError(f"{csv_path} needs the columns path,rating")
    ratings = []
    for line, row in enumerate(rows, start=2):
        image = csv_path.parent / row["path"]
        if not image.is_file():
            raise CliError(f"{csv_path}:{line}: no such image {row['path']}")
        try:
            value = float(row["rating"])
        except ValueError:
            raise CliError(f"{csv_path}:{line}: rating {row['rating']!r} is not a number") from None
        ratings.append(Rating(image, value, scale))
    return ratings


def _chunk_request_id(import_id: str, user: str, ratings: Sequence[Rating]) -> str:
    """The AddRatings request_id of one chunk of a named import: the import's name and what the chunk
    records (user, each image's bytes, value and scale), so running the same import again records each
    chunk once within the service's receipt TTL."""
    h = hashlib.sha256(f"{import_id}\n{user}\n".encode())
    for r in ratings:
        h.update(hashlib.sha256(Path(str(r.image)).read_bytes()).digest())
        h.update(f"{r.value!r}:{r.scale};".encode())
    return f"cli-{h.hexdigest()[:60]}"


def cmd_rate(client: Client, args: argparse.Namespace) -> None:
    ratings = _read_ratings(Path(args.csv), args.scale)
    receipt = None
    replayed = 0
    for start in range(0, len(ratings), CHUNK):
        chunk = ratings[start : start + CHUNK]
        # Without a name every run is its own call (a fresh id per chunk, retried safely by the client).
        request_id = _chunk_request_id(args.import_id, args.user, chunk) if args.import_id else None
        receipt = client.add_ratings(args.user, chunk, request_id=request_id)
        replayed += len(chunk) if receipt.replayed else 0
    assert receipt is not None  # _read_ratings refuses an empty file
    profile = receipt.profile
    earlier = f" ({replayed} were recorded by this import before: not counted again)" if replayed else ""
    _emit(
        args,
        {**asdict(profile), "already_recorded": replayed},
        f"recorded {len(ratings)} ratings for {args.user}{earlier}; profile now holds {profile.num_ratings}",
    )


def cmd_suggest(client: Client, args: argparse.Namespace) -> None:
    paths = _images([args.directory])
    suggestions = client.suggest_images_to_rate(args.user, paths, args.k)
    rows = [[str(i + 1), s.id, f"{s.uncertainty:.3f}"] for i, s in enumerate(suggestions)]
    _emit(args, [asdict(s) for s in suggestions], _table(rows, ["#", "image", "uncertainty"]))


def cmd_profile(client: Client, args: argparse.Namespace) -> None:
    profile = client.get_profile(args.user)
    if not profile.exists:
        _emit(args, asdict(profile), f"no profile for user {args.user!r}: rate some photos with `piaa rate`")
        return
    lines = [
        f"user {profile.user_id}: {profile.num_ratings} ratings, feature space "
        f"{profile.feature_space_version}",
        "likes:    " + ", ".join(f"{f.name} (+{f.weight:.3f})" for f in profile.likes),
        "dislikes: " + ", ".join(f"{f.name} ({f.weight:.3f})" for f in profile.dislikes),
    ]
    _emit(args, asdict(profile), "\n".join(lines))


def cmd_forget(client: Client, args: argparse.Namespace) -> None:
    deleted = client.delete_profile(args.user)
    text = f"deleted everything stored for {args.user}" if deleted else f"nothing stored for {args.user}"
    _emit(args, {"user_id": args.user, "deleted": deleted}, text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="piaa", description="Personalized image aesthetics from the shell.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        default=os.environ.get("PIAA_SERVER", DEFAULT_TARGET),
        help="gateway HOST:PORT (default: $PIAA_SERVER, else %(default)s)",
    )
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    common.add_argument("--timeout", type=float, default=60.0, help="deadline of each call, seconds")
    common.add_argument("--token", default=os.environ.get("PIAA_TOKEN"), help="bearer token ($PIAA_TOKEN)")
    common.add_argument("--tenant", default=os.environ.get("PIAA_TENANT"), help="tenant ($PIAA_TENANT)")
    common.add_argument("--tls", action="store_true", help="connect with TLS")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(
        name: str,
        run: Callable[[Client, argparse.Namespace], int | None],
        text: str,
        *extra: argparse.ArgumentParser,
    ) -> Any:
        p = sub.add_parser(name, parents=[common, *extra], help=text, description=text)
        p.add_argument("--user", required=True, help="the user id")
        p.set_defaults(run=run)
        return p

    strict = argparse.ArgumentParser(add_help=False)
    strict.add_argument(
        "--strict",
        action="store_true",
        help=f"all or nothing: one bad image fails the command (exit {EXIT_SERVER}); by default the others "
        f"are scored and the bad ones listed on stderr (exit {EXIT_PARTIAL})",
    )
    score = command("score", cmd_score, "score images for a user", strict)
    score.add_argument("paths", nargs="+", help="files or dirs")
    rank = command("rank", cmd_rank, "rank an album by a user's taste", strict)
    rank.add_argument("directory")
    rank.add_argument("--top", type=int, default=0, help="show only the best N (0: all)")
    rank.add_argument("--html", help="write a self-contained HTML album report here")
    rank.add_argument("--ratings", help="CSV path,rating of known ratings, shown in the report")
    rank.add_argument("--scale", choices=["stars", "unit"], default="stars")
    rate = command("rate", cmd_rate, "record ratings from a CSV with columns path,rating")
    rate.add_argument("csv")
    rate.add_argument("--scale", choices=["stars", "unit"], default="stars", help="1-5 stars or [0, 1]")
    rate.add_argument(
        "--import-id",
        default="",
        help="name this import: running it again with the same name within 24 h (say after a failure "
        "part-way) records nothing twice; without a name every run records its ratings",
    )
    suggest = command("suggest", cmd_suggest, "which photos of a folder the user should rate next")
    suggest.add_argument("directory")
    suggest.add_argument("-k", type=int, default=10, help="how many to suggest")
    command("profile", cmd_profile, "show a user's profile and taste")
    command("forget", cmd_forget, "delete everything stored for a user")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with Client(
            args.server, timeout=args.timeout, token=args.token, tenant=args.tenant, tls=args.tls
        ) as c:
            code = args.run(c, args)
    except CliError as err:
        print(f"piaa: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Unavailable as err:
        print(f"piaa: cannot reach the PIAA gateway at {args.server} ({err})", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except PiaaError as err:
        print(f"piaa: {err}", file=sys.stderr)
        return EXIT_SERVER
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
