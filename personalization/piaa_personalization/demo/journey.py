"""`make demo`: the journey end to end on this machine.

Starts the whole stack (`piaa serve`: Redis, Triton with the CPU profile, the gateway) on free loopback
ports, then, through the `piaa` CLI and the client: a simulated user rates part of an album, the held-out
photos are ranked generic versus personalized side by side, the user's taste profile is shown, the HTML
album report is written, the next photos to rate are suggested; finally everything is stopped.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from scipy.stats import spearmanr

from piaa_client import cli
from piaa_client.client import Client
from piaa_personalization.demo import album
from piaa_personalization.gateway_process import SERVE_MODULE, GatewayProcess

STARTUP_TIMEOUT_S = 300.0


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def start_stack(log_path: Path) -> GatewayProcess:
    """Starts `piaa serve` on a free port (this environment, PIAA_* included) and waits for its ready line.

    Raises piaa_common.process.ProcessStartError with the log's tail when it does not start.
    """
    stack = GatewayProcess(
        ["--port", "0"],
        module=SERVE_MODULE,
        env=os.environ,
        log_path=log_path,
        start_timeout_s=STARTUP_TIMEOUT_S,
        stop_grace_s=60.0,
    ).start()
    for name in ("redis", "triton"):
        print(f"  serve: {name} {stack.line_starting(name + ' ')}", flush=True)
    print(f"  serve: gateway {stack.address} (log: {log_path})", flush=True)
    return stack


def _split(photos: list[Path], rated_dir: Path, album_dir: Path, n_rated: int, seed: int) -> None:
    """Links a random n_rated photos into rated_dir and the rest into album_dir."""
    order = photos[:]
    random.Random(seed).shuffle(order)
    for directory, chosen in ((rated_dir, order[:n_rated]), (album_dir, order[n_rated:])):
        directory.mkdir(parents=True, exist_ok=True)
        for photo in chosen:
            link = directory / photo.name
            if not link.exists():
                link.symlink_to(photo.resolve())


def _side_by_side(client: Client, user: str, album_dir: Path, stars: dict[str, int]) -> None:
    paths = sorted(album_dir.iterdir())
    ranked = cli.rank_directory(client, user, paths, quiet=True)
    by_generic = sorted(ranked, key=lambda s: s.generic_score, reverse=True)
    print(f"{'#':>3}  {'generic ranking':<34}{'stars':>5}   {'personalized ranking':<34}{'stars':>5}")
    for i, (g, p) in enumerate(zip(by_generic[:12], ranked[:12], strict=True), start=1):
        print(f"{i:>3}  {g.id:<34}{stars[g.id]:>5}   {p.id:<34}{stars[p.id]:>5}")
    truth = [stars[s.id] for s in ranked]
    generic_rho = spearmanr([s.generic_score for s in ranked], truth).statistic
    personal_rho = spearmanr([s.score for s in ranked], truth).statistic
    print(
        f"\nSpearman with {user}'s own stars on the {len(ranked)} held-out photos: "
        f"generic {generic_rho:+.3f}, personalized {personal_rho:+.3f}"
    )


def run_journey(server: str, photos: list[Path], work: Path, n_rated: int, seed: int) -> None:
    """The demo user's journey against a running gateway."""
    user = album.RATER_NAME
    rated_dir, album_dir = work / "rated", work / "album"
    _split(photos, rated_dir, album_dir, n_rated, seed)
    stars = album.write_ratings(sorted(rated_dir.iterdir()), work / "ratings.csv", seed)
    stars |= album.write_ratings(sorted(album_dir.iterdir()), work / "album_ratings.csv", seed + 1)
    common = ["--server", server, "--user", user]

    def piaa(*args: str) -> None:
        print(f"\n$ piaa {args[0]} --user {user} {' '.join(args[1:])}", flush=True)
        code = cli.main([args[0], *common, *args[1:]])
        if code != 0:
            raise RuntimeError(f"piaa {args[0]} failed with exit code {code}")

    _banner(f"{user} ({album.RATER_TASTE}) rates {n_rated} photos")
    piaa("forget")
    piaa("rate", str(work / "ratings.csv"), "--scale", "stars")
    _banner("the taste PIAA learned")
    piaa("profile")
    _banner(f"the other {len(photos) - n_rated} photos: generic ranking vs {user}'s personalized ranking")
    with Client(server, timeout=120) as client:
        _side_by_side(client, user, album_dir, stars)
    _banner("album report (rank --html)")
    report = work / "report.html"
    piaa(
        "rank",
        str(album_dir),
        "--top",
        "24",
        "--html",
        str(report),
        "--ratings",
        str(work / "album_ratings.csv"),
    )
    _banner("what to rate next (active learning)")
    piaa("suggest", str(album_dir), "-k", "5")
    print(f"\nreport: {report.resolve()}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="piaa demo", description=__doc__)
    parser.add_argument("--photos", type=Path, help="a folder of your own photos (default: bundled samples)")
    parser.add_argument("--out", type=Path, default=Path("build/demo"), help="where the album and report go")
    parser.add_argument("--rated", type=int, default=40, help="how many photos the demo user rates")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    photos = album.make_album(args.out / "photos", args.photos)
    if len(photos) < args.rated + 5:
        raise SystemExit(f"need at least {args.rated + 5} photos, found {len(photos)}")
    run_dir = args.out / time.strftime("run-%Y%m%d-%H%M%S")
    _banner(f"starting Redis, Triton and the gateway ({len(photos)} photos in the album)")
    stack = start_stack(args.out / "serve.log")
    try:
        run_journey(stack.address, photos, run_dir, args.rated, args.seed)
    finally:
        _banner("stopping the stack")
        # SIGTERM, as an operator would: the stack drains and stops its children.
        code = stack.stop()
        print(f"stack stopped (exit code {code})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
