"""`piaa serve` (`make serve`): Redis (unless --redis-url), Triton (CPU profile) and the gateway, locally.

With --redis-mode cluster and no --redis-url it starts a local Redis Cluster (3 primaries, 3 replicas).
Prints the gateway's address once everything is ready; SIGINT or SIGTERM stops the gateway (draining
in-flight calls), then Triton, then the Redis it started.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from piaa_personalization import config as config_module
from piaa_personalization.api.server import announce_ready, run
from piaa_personalization.config import DEFAULT_PORT, GatewayConfig
from piaa_personalization.store.redis_cluster import LocalCluster
from piaa_personalization.store.redis_server import RedisServer


def parse(argv: Sequence[str]) -> tuple[GatewayConfig, argparse.Namespace]:
    """The gateway config (defaults < PIAA_* < flags) and serve's own flags."""
    parser = argparse.ArgumentParser(
        prog="piaa serve",
        allow_abbrev=False,
        description=f"Start Redis, Triton (CPU profile) and the PIAA gateway (default port {DEFAULT_PORT}).",
    )
    parser.add_argument("--repository", default=None, help="Triton model repository (default: the cpu build)")
    parser.add_argument("--redis-aof", action="store_true", help="persist the local Redis (appendonly)")
    config_module.add_arguments(parser)
    args = parser.parse_args(list(argv))
    return config_module.from_namespace(args, os.environ), args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the stack until SIGINT/SIGTERM; returns the exit code."""
    config, args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.ExitStack() as stack:
        if not config.redis_url and config.redis_mode == "cluster":
            cluster = stack.enter_context(LocalCluster())
            print(f"redis   {cluster.url} (cluster: 3 primaries, 3 replicas)", flush=True)
            config = config.replace(redis_url=cluster.url)
        if not config.redis_url:
            redis = stack.enter_context(RedisServer(appendonly=args.redis_aof))
            print(f"redis   {redis.url}", flush=True)
            config = config.replace(redis_url=redis.url)
        if config.history_url:
            print(f"history {config.history_url}", flush=True)
        if not config.triton_url:
            from piaa_triton.paths import repository_dir
            from piaa_triton.server import ServerOptions, TritonServer

            repository = Path(args.repository) if args.repository else repository_dir("cpu")
            triton = stack.enter_context(TritonServer(ServerOptions(repository=repository)))
            print(f"triton  {triton.grpc_url}", flush=True)
            config = config.replace(triton_url=triton.grpc_url)
        run(config, ready=announce_ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
