"""Locust load test of a PIAA gateway: platform users calling Score, ScoreStream, RankAlbum and AddRatings.

    locust -f benchmarks/locustfile.py --headless -u 20 -r 10 -t 60s --host 127.0.0.1:50151 --csv out/run
    locust -f benchmarks/locustfile.py --headless --processes 4 -u 200 -r 20 -t 5m --host GATEWAY:50151 \\
        --slo-p99-ms 250 --slo-max-error-ratio 0.001 --slo-min-rps 150
    locust -f benchmarks/locustfile.py --master --expect-workers 8 ...  # and `--worker --master-host M`

Each simulated user is one person of a photo platform (piaa_bench.traffic: Zipf-popular users, a share of
repeat photos, upload-sized images) with its own gRPC channel (its own connection, so several gateway pods
or worker processes share the load as they would share real clients), built on piaa_client.Client. Every
call (every request of a ScoreStream) is reported to Locust's statistics as request type "grpc", name = the
RPC, failures named by their gRPC status. The mix is set by the --piaa-weight-* options (or their
PIAA_LOCUST_* environment variables), and `--tags score|stream|album|ratings` runs only the tagged calls.
The --slo-* options turn the run into an exit code (3 when the objective is missed; piaa_bench.slo).
Photos: --piaa-photos DIR (default ../shared/data/photos when present), else JPEGs generated with Pillow.
docs/operations.md, "Load-testing a deployment", says how to run it from several machines and on Kubernetes.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, argument_parser, events, tag, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from piaa_bench.slo import Observed, Slo, breaches
from piaa_bench.traffic import Traffic, UploadSizes, photo_pool
from piaa_client import Client, Rating, RetryPolicy
from piaa_client.calls import ScoreJob
from piaa_client.errors import PiaaError

log = logging.getLogger("piaa.locust")
# A Locust worker handling a spawn message rebuilds Locust's default options (a whole parse, ~25 ms) once per
# option the master sent: with this file's options that blocked the worker for 2-3 s, and past 3 s under
# load, so its master dropped it for missed heartbeats (gevent's monitor showed where). The defaults never
# change within a process.
argument_parser.default_args_dict = functools.cache(argument_parser.default_args_dict)
SHARED_PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "photos"
REQUEST_TYPE = "grpc"
SLO_MISSED_EXIT_CODE = 3
"""Locust's own codes: 1 for failed requests or errors without an SLO, 2 for an unhandled exception."""


@events.init.add_listener
def _grpc_on_gevent(**_: Any) -> None:
    """gRPC's I/O on gevent's loop, so a blocking call parks only its own user: in each process (Locust
    forks the --processes workers after importing this file), before its first channel."""
    grpc_gevent.init_gevent()


OPTIONS: tuple[tuple[str, Any, str], ...] = (
    (
        "photos",
        "",
        "photo folder; empty: ../shared/data/photos if present, else generated JPEGs; 'synthetic'",
    ),
    ("pool", 24, "photos each Locust process makes at its start and keeps in memory"),
    ("upload-px", 1024, "median long side of the photos sent (log-normal, 320-2048 px); 0: a folder's as is"),
    ("users", 10_000, "platform users whose ids are drawn"),
    ("user-zipf", 1.1, "Zipf exponent of the user ids' popularity"),
    (
        "repeat-share",
        0.3,
        "share of images that are a popular photo again (a feature-cache hit), not uploads",
    ),
    ("popular", 16, "photos of the pool that come back (Zipf)"),
    ("think-s", 1.0, "mean think time between a user's calls, s (exponential: Poisson calls); 0: none"),
    ("weight-score", 60, "weight of the Score calls in the mix"),
    ("weight-stream", 20, "weight of the ScoreStream bursts in the mix"),
    ("weight-album", 10, "weight of the RankAlbum calls in the mix"),
    ("weight-ratings", 10, "weight of the AddRatings calls in the mix"),
    ("score-images", 4, "most images per Score call (1..N, Zipf: mostly 1)"),
    ("stream-requests", 8, "one-image requests per ScoreStream burst"),
    ("stream-window", 4, "requests in flight on a ScoreStream"),
    ("album-images", 12, "images per RankAlbum call"),
    ("ratings", 3, "ratings per AddRatings call"),
    ("timeout-s", 30.0, "deadline of each call, s"),
    ("max-attempts", 1, "attempts per call: 1 shows every shed or failed call; the client's default is 4"),
    ("token-file", "", "file holding the API key (a mounted Secret)"),
    ("tenant", "", "tenant header, for a gateway without API keys"),
    ("ca-file", "", "PEM roots for --piaa-tls (default: the system's)"),
)
"""--piaa-<name> options: (name, default, help); each is also read from PIAA_LOCUST_<NAME>."""

SLO_OPTIONS: tuple[tuple[str, str], ...] = (
    ("p99-ms", "largest p99 of each RPC in --slo-rpcs, ms"),
    ("max-error-ratio", "largest share of failed requests over all RPCs (0.001 = 0.1 %%)"),
    ("min-rps", "requests/s the run must reach: the rate the objective is for"),
)


def env_name(prefix: str, name: str) -> str:
    return f"PIAA_LOCUST_{prefix}{name.replace('-', '_').upper()}"


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    """The custom options; Locust sends them from the master to its workers."""
    piaa = parser.add_argument_group("PIAA workload", "what the simulated platform users send")
    for name, default, text in OPTIONS:
        env = env_name("", name)
        kind = type(default)
        piaa.add_argument(f"--piaa-{name}", type=kind, default=default, env_var=env, help=f"{text} (${env})")
    parser.add_argument(  # on the parser itself: argument groups know no is_secret
        "--piaa-token", default="", env_var="PIAA_TOKEN", is_secret=True, help="API key ($PIAA_TOKEN)"
    )
    piaa.add_argument("--piaa-tls", action="store_true", env_var="PIAA_LOCUST_TLS", help="TLS to the gateway")
    slo = parser.add_argument_group(
        "SLO", f"the run's exit code: {SLO_MISSED_EXIT_CODE} when a bound is missed"
    )
    for name, text in SLO_OPTIONS:
        env = env_name("SLO_", name)
        slo.add_argument(f"--slo-{name}", type=float, default=None, env_var=env, help=f"{text} (${env})")
    rpcs = "RPCs whose p99 is checked, comma-separated (default: every RPC that ran; $PIAA_LOCUST_SLO_RPCS)"
    slo.add_argument("--slo-rpcs", default="", env_var="PIAA_LOCUST_SLO_RPCS", help=rpcs)


class _Process:
    """What the users of one Locust process share: the photo pool, made once, and the logged failures."""

    lock = threading.Lock()  # a gevent lock once Locust has patched threading
    photos: ClassVar[dict[tuple[str, int, int], list[bytes]]] = {}
    logged: ClassVar[set[tuple[str, str]]] = set()


def photos_of(options: Any) -> list[bytes]:
    """This process's photo pool for the options' photos, pool and upload_px (made on first use)."""
    key = (options.piaa_photos, options.piaa_pool, options.piaa_upload_px)
    with _Process.lock:
        if key not in _Process.photos:
            choice = options.piaa_photos
            folder = Path(choice) if choice and choice != "synthetic" else None
            if not choice and SHARED_PHOTOS.is_dir():
                folder = SHARED_PHOTOS
            sizes = UploadSizes(median_px=options.piaa_upload_px) if options.piaa_upload_px > 0 else None
            # Seconds of CPU (more on a busy machine): in a native thread of gevent's pool, so the loop keeps
            # sending the worker's heartbeats (a master drops a worker that misses them for 3 s).
            rng = random.Random(os.getpid())
            pool = gevent.get_hub().threadpool
            photos, source = pool.apply(photo_pool, (folder, options.piaa_pool, sizes, rng))
            log.info("process %d sends %s (%.0f KiB each on average)", os.getpid(), source,
                     sum(map(len, photos)) / len(photos) / 1024)  # fmt: skip
            _Process.photos = {key: photos}
        return _Process.photos[key]


def traffic_of(options: Any) -> Traffic:
    """The users and images a user of this process draws from (the options as the master sent them)."""
    return Traffic(
        photos_of(options),
        users=options.piaa_users,
        user_zipf_s=options.piaa_user_zipf,
        repeat_share=options.piaa_repeat_share,
        popular=options.piaa_popular,
    )


@events.init.add_listener
def _make_photos(environment: Environment, **_: Any) -> None:
    """A worker (or a single process) makes its photos before the test starts, not at its first user."""
    if environment.parsed_options is not None and not isinstance(environment.runner, MasterRunner):
        gevent.spawn(photos_of, environment.parsed_options)


class _Client(Client):
    """piaa_client.Client on a channel of its own (a private subchannel pool: its own connection)."""

    def _open_channel(self, target: str, credentials: grpc.ChannelCredentials | None) -> Any:
        options = (*self._options, ("grpc.use_local_subchannel_pool", 1))
        if credentials is not None:
            return grpc.secure_channel(target, credentials, options)
        return grpc.insecure_channel(target, options)


def open_client(host: str, options: Any) -> Client:
    """A client for the gateway at `host` with the run's key, tenant, TLS, deadline and retries."""
    token = options.piaa_token or None
    if options.piaa_token_file:
        token = Path(options.piaa_token_file).read_text().strip()
    roots = Path(options.piaa_ca_file).read_bytes() if options.piaa_ca_file else None
    return _Client(
        host,
        timeout=options.piaa_timeout_s,
        tls=options.piaa_tls,
        root_certificates=roots,
        token=token,
        tenant=options.piaa_tenant or None,
        retry=RetryPolicy(max_attempts=options.piaa_max_attempts),
    )


def status_of(error: PiaaError) -> str:
    """The failure's name in Locust's statistics: the gRPC status."""
    return error.code.name if error.code is not None else "UNKNOWN"


class PiaaUser(User):
    """One person of the platform: scores feeds, streams a burst, ranks an album, rates photos, thinking
    between calls. `--host` is the gateway, HOST:PORT."""

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        if not self.host:
            raise ValueError("set the gateway with --host HOST:PORT")
        self.options: Any = environment.parsed_options
        self.rng = random.Random()
        self.traffic = traffic_of(self.options)
        self.client = open_client(self.host, self.options)

    def wait_time(self) -> float:
        mean = self.options.piaa_think_s
        return self.rng.expovariate(1.0 / mean) if mean > 0 else 0.0

    def on_stop(self) -> None:
        self.client.close()

    def report(self, rpc: str, started: float, size: int, error: PiaaError | None = None) -> None:
        """One call (or stream request) into Locust's statistics; `size` is the bytes of photos it sent."""
        failure = status_of(error) if error is not None else None
        if failure is not None and (rpc, failure) not in _Process.logged:
            _Process.logged.add((rpc, failure))  # the details of the first of each kind; the stats count them
            log.warning("%s failed: %s", rpc, error)
        self.environment.events.request.fire(
            request_type=REQUEST_TYPE,
            name=rpc,
            response_time=(time.perf_counter() - started) * 1e3,
            response_length=size,
            exception=failure,
            context={},
        )

    def call(self, rpc: str, images: list[bytes], send: Callable[[], object]) -> None:
        started = time.perf_counter()
        try:
            send()
        except PiaaError as error:
            self.report(rpc, started, sum(map(len, images)), error)
        else:
            self.report(rpc, started, sum(map(len, images)))

    @tag("score")
    @task
    def score(self) -> None:
        """A feed or an upload: 1..N images (Zipf: mostly one), the user's scores."""
        user, images = self.traffic.user(self.rng), self.traffic.images(self.rng, self._score_count())
        self.call("Score", images, lambda: self.client.score(user, images))

    def _score_count(self) -> int:
        most = max(1, self.options.piaa_score_images)
        weights = [1.0 / k for k in range(1, most + 1)]
        return self.rng.choices(range(1, most + 1), weights)[0]

    @tag("stream")
    @task
    def score_stream(self) -> None:
        """A client scoring at a high rate: one-image requests on one ScoreStream, each one reported."""
        user = self.traffic.user(self.rng)
        queued: deque[tuple[float, int]] = deque()

        def jobs() -> Iterator[ScoreJob]:
            for _ in range(self.options.piaa_stream_requests):
                images = self.traffic.images(self.rng, 1)
                queued.append((time.perf_counter(), len(images[0])))  # taken when the window has room
                yield user, images

        answers = self.client.score_stream(jobs(), window=max(1, self.options.piaa_stream_window))
        try:
            for answer in answers:
                started, size = queued.popleft()
                self.report("ScoreStream", started, size, answer if isinstance(answer, PiaaError) else None)
        except PiaaError as error:  # the stream itself failed: every request it had not answered did
            while queued:
                started, size = queued.popleft()
                self.report("ScoreStream", started, size, error)

    @tag("album")
    @task
    def rank_album(self) -> None:
        """An album to cull: the user's best three of it."""
        user = self.traffic.user(self.rng)
        images = self.traffic.images(self.rng, self.options.piaa_album_images)
        self.call("RankAlbum", images, lambda: self.client.rank_album(user, images, top_k=3))

    @tag("ratings")
    @task
    def add_ratings(self) -> None:
        """The user rates a few photos (1-5 stars): their profile is refitted."""
        user = self.traffic.user(self.rng)
        images = self.traffic.images(self.rng, self.options.piaa_ratings)
        ratings = [Rating(image, self.rng.randint(1, 5)) for image in images]
        self.call("AddRatings", images, lambda: self.client.add_ratings(user, ratings))


WEIGHTS = {
    PiaaUser.score: "piaa_weight_score",
    PiaaUser.score_stream: "piaa_weight_stream",
    PiaaUser.rank_album: "piaa_weight_album",
    PiaaUser.add_ratings: "piaa_weight_ratings",
}


def weighted_tasks(options: Any) -> list[Any]:
    """PiaaUser's tasks, each repeated by its weight (as Locust weighs tasks), after --tags/--exclude-tags."""
    tags = set(options.tags) if getattr(options, "tags", None) else None
    excluded = set(getattr(options, "exclude_tags", None) or ())
    out: list[Any] = []
    for fn, option in WEIGHTS.items():
        labels: set[str] = getattr(fn, "locust_tag_set", set())
        if (tags is None or labels & tags) and not labels & excluded:
            out += [fn] * max(0, getattr(options, option))
    return out


@events.test_start.add_listener
def _weigh_tasks(environment: Environment, **_: Any) -> None:
    """The mix from the options the master sent (on a worker, test_start follows the spawn message)."""
    tasks = weighted_tasks(environment.parsed_options)
    if not tasks:
        raise ValueError("no PIAA call left to make: every weight is 0 or --tags selects none")
    PiaaUser.tasks = tasks


def slo_of(options: Any) -> Slo:
    rpcs = tuple(name.strip() for name in (options.slo_rpcs or "").split(",") if name.strip())
    return Slo(options.slo_p99_ms, options.slo_max_error_ratio, options.slo_min_rps, rpcs)


@events.quitting.add_listener
def _check_slo(environment: Environment, **_: Any) -> None:
    """On the master (or a single process): the run's exit code from the --slo-* bounds over all RPCs."""
    if isinstance(environment.runner, WorkerRunner) or environment.parsed_options is None:
        return
    slo = slo_of(environment.parsed_options)
    if not slo.active:
        return
    stats = environment.stats
    per_rpc = {
        entry.name: Observed(
            entry.num_requests, entry.num_failures, entry.get_response_time_percentile(0.99) or 0.0
        )
        for entry in stats.entries.values()
        if entry.method == REQUEST_TYPE
    }
    total = Observed(
        stats.total.num_requests, stats.total.num_failures, stats.total.get_response_time_percentile(0.99)
    )
    missed = breaches(slo, per_rpc, total, stats.total.total_rps)
    if missed:
        log.error("SLO missed: %s", "; ".join(missed))
        environment.process_exit_code = SLO_MISSED_EXIT_CODE
        return
    log.info(
        "SLO met: %d requests at %.1f/s, %d failed", total.requests, stats.total.total_rps, total.failures
    )
    if environment.runner is not None and not environment.runner.exceptions:
        environment.process_exit_code = 0  # failures within --slo-max-error-ratio are allowed
