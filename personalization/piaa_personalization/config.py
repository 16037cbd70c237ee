"""The gateway's typed configuration, read in one place: defaults < environment (PIAA_*) < flags."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import itertools
import logging
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

from piaa_client.defaults import DEFAULT_PORT, MAX_MESSAGE_BYTES, TENANT_HEADER

ENV_PREFIX = "PIAA_"

READ_ELSEWHERE = {
    "PIAA_SERVER": "the piaa CLI's gateway address",
    "PIAA_TOKEN": "the piaa CLI's API key",
    "PIAA_TENANT": "the piaa CLI's tenant",
    "PIAA_BUILD_DIR": "piaa_triton's build folder",
    "PIAA_ONNX_DIR": "the Triton image's launcher",
    "PIAA_GATEWAY_IMAGE": "docker compose",
    "PIAA_TRITON_IMAGE": "docker compose",
    "PIAA_GATEWAY_PORT": "docker compose",
    "PIAA_PROMETHEUS_PORT": "docker compose",
}
"""PIAA_* variables that other components read: not gateway settings, and not typos of one."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway can be told. Each field is also `PIAA_<FIELD>` and `--<field>`."""

    host: str = "127.0.0.1"
    """Address the gRPC server binds; 0.0.0.0 to serve other machines."""
    port: int = DEFAULT_PORT
    """gRPC port; 0 picks a free one (only with workers=1)."""
    workers: int = 1
    """Gateway processes sharing the port through SO_REUSEPORT (one per core uses every core)."""
    metrics_port: int = 0
    """Prometheus /metrics port of the first worker (worker i uses metrics_port + i); 0 disables."""
    redis_url: str = ""
    """Profile store, e.g. redis://:password@host:6379/0; empty: `piaa serve` starts a local redis-server."""
    redis_password_file: str = ""
    """File holding the Redis password (a mounted Secret), read when the config is loaded from the
    environment or flags and put into redis_url, which then names no password (redis://host:6379/0, or
    redis://user@host:6379/0 for an ACL user)."""
    triton_url: str = ""
    """Triton gRPC address host:port; empty: `piaa serve` starts Triton with the CPU profile."""
    triton_model: str = "piaa"
    """Name of the Triton ensemble that turns encoded images into head outputs."""
    triton_max_inflight: int = 2
    """Triton calls in flight at once; more wait in the gateway (deadline-aware), not in Triton's queue."""
    max_batch_size: int = 16
    """Most images per micro-batch (Triton calls are also split to the ensemble's own max_batch_size)."""
    max_batch_delay_ms: float = 2.0
    """Longest an image waits in the micro-batcher for others to join its batch."""
    max_concurrent_batches: int = 4
    """Batches in flight to Triton at once; more queue in the batcher (back-pressure)."""
    max_queued_images: int = 1024
    """Images waiting in the micro-batcher beyond which calls are refused with RESOURCE_EXHAUSTED."""
    default_timeout_s: float = 30.0
    """Deadline applied to calls that carry none (also passed on to Triton)."""
    max_images_per_request: int = 64
    """Most images in one Score / RankAlbum / SuggestImagesToRate / AddRatings call."""
    max_users_per_request: int = 1000
    """Most user ids in one ScoreForUsers call."""
    max_stream_in_flight: int = 32
    """Requests of one ScoreStream handled at once; the next ones wait unread, so HTTP/2 flow control holds
    the client back."""
    max_user_id_bytes: int = 128
    """Longest user id, in UTF-8 bytes."""
    max_message_bytes: int = MAX_MESSAGE_BYTES
    """Largest gRPC message received (the sum of a request's images)."""
    profile_cache_size: int = 10_000
    """Profiles kept in each worker's in-process LRU."""
    profile_cache_ttl_s: float = 5.0
    """Longest a cached profile is trusted without a refresh (pub/sub invalidates sooner)."""
    refit_concurrency: int = 2
    """Refits of stale profiles each worker runs at once (each holds one Redis connection at a time)."""
    refit_queue_size: int = 256
    """Refits of stale profiles waiting beyond refit_concurrency; more are dropped (counted) and asked for
    again at the user's next stale read."""
    feature_cache_ttl_s: int = 7 * 24 * 3600
    """How long the head outputs of an image stay cached in Redis by digest."""
    feature_memory_size: int = 20_000
    """Images whose head outputs (and SHA-256, by BLAKE3) each worker keeps in memory: a request whose
    images and user are all in memory is answered without Redis or the micro-batcher; 0 turns it off."""
    redis_key_prefix: str = "piaa"
    """First segment of every Redis key; lets several deployments share one Redis."""
    redis_socket_timeout_s: float = 2.0
    """Per-command Redis timeout; a command that takes longer counts as the store being unavailable."""
    redis_connect_timeout_s: float = 2.0
    """Timeout of opening a Redis connection."""
    redis_max_connections: int = 64
    """Redis connection pool size per gateway process."""
    redis_pool_timeout_s: float = 10.0
    """How long a call waits for a free pooled Redis connection before the store counts as unavailable."""
    redis_retries: int = 2
    """Retries (exponential backoff) of a Redis command that hit a connection error or timeout."""
    redis_mode: str = "standalone"
    """`standalone` (one Redis) or `cluster` (Redis Cluster: redis_url names any one node, e.g.
    redis://10.0.0.5:7000; the others are discovered)."""
    redis_min_replica_acks: int = -1
    """Replicas that must hold a rating (Redis WAIT) before AddRatings answers OK; fewer within
    redis_replica_ack_timeout_ms fails the call UNAVAILABLE. -1: 1 in cluster mode, 0 standalone."""
    redis_replica_ack_timeout_ms: int = 1000
    """How long AddRatings waits for its replica acknowledgements."""
    history_url: str = ""
    """The rating history, a Delta Lake table: a folder, or s3://, gs://, abfss:// (docs/history.md). Set,
    AddRatings also writes each rating to a Redis outbox in the same step, which `piaa-admin history drain`
    appends to the table; empty: no history, nothing extra written."""
    history_max_backlog: int = 2000
    """Ratings one Redis hash slot's history outbox may hold (history_url set): beyond, AddRatings for
    that slot's users is refused UNAVAILABLE until the history writer catches up."""
    prior_cache_ttl_s: float = 60.0
    """How long each worker trusts its in-process copy of a tenant's population prior."""
    prior_relearn_min_users: int = 20
    """Users with 10+ ratings a tenant needs before a gateway learns its population prior in the
    background (under a Redis lock: one gateway at a time); 0 leaves it to `store.tools learn-prior`."""
    prior_relearn_growth: float = 2.0
    """The prior is relearned each time the tenant's enrolled users reach this multiple of the last
    learning's (> 1)."""
    prior_relearn_max_users: int = 2000
    """Most profiles one learning reads and fits: its cost bound (docs/quality.md measures a fit)."""
    with_embedding: bool = False
    """Personalize on the 64-d embedding too (not only the paper's 20 features)."""
    health_check_interval_s: float = 1.0
    """How often the gateway asks Triton whether the ensemble is ready; the gRPC health of
    piaa.v1.Personalization follows it (the overall "" status only turns NOT_SERVING when draining)."""
    drain_grace_s: float = 10.0
    """On shutdown: health NOT_SERVING, then in-flight calls get this long to finish."""
    tenant_header: str = TENANT_HEADER
    """Metadata key naming the caller's tenant when no API keys are configured."""
    default_tenant: str = "default"
    """Tenant of calls that name none (only without api_keys_file)."""
    api_keys_file: str = ""
    """Keys file (`sha256:<hex> <tenant>` lines, see api/auth.py); set, every call needs a key and the key
    decides the tenant. Empty: no authentication (development only)."""
    rate_limit_per_s: float = 0.0
    """Requests per second each tenant may make to each worker (token bucket); 0 disables."""
    rate_limit_burst: int = 50
    """Requests a tenant may make at once above its rate (the bucket's size)."""
    tls_cert_file: str = ""
    """PEM server certificate chain; with tls_key_file the gateway serves TLS only."""
    tls_key_file: str = ""
    """PEM private key of tls_cert_file."""
    tls_client_ca_file: str = ""
    """PEM CA bundle; set, clients must present a certificate it signed (mutual TLS)."""

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port {self.port} is not a TCP port")
        if self.workers < 1:
            problems.append("workers must be >= 1")
        if self.workers > 1 and self.port == 0:
            problems.append("several workers need a fixed port to share")
        positive = (
            "max_batch_size",
            "max_concurrent_batches",
            "triton_max_inflight",
            "max_queued_images",
            "max_images_per_request",
            "max_users_per_request",
            "max_stream_in_flight",
            "max_user_id_bytes",
            "max_message_bytes",
            "redis_max_connections",
            "refit_concurrency",
        )
        for name in positive:
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            problems.append("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            problems.append("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.rate_limit_per_s < 0 or self.rate_limit_burst < 1:
            problems.append("rate_limit_per_s must be >= 0 and rate_limit_burst >= 1")
        relearn = (self.prior_relearn_min_users, self.prior_relearn_growth, self.prior_relearn_max_users)
        if relearn[0] < 0 or relearn[1] <= 1 or relearn[2] < 2:
            problems.append("prior_relearn_: min_users must be >= 0, growth > 1, max_users >= 2")
        if (
            self.max_batch_delay_ms < 0
            or self.default_timeout_s <= 0
            or self.health_check_interval_s <= 0
            or self.profile_cache_ttl_s < 0
            or self.prior_cache_ttl_s < 0
            or self.redis_socket_timeout_s <= 0
            or self.redis_connect_timeout_s <= 0
            or self.redis_pool_timeout_s <= 0
        ):
            problems.append("delays and timeouts must be positive")
        if self.redis_retries < 0:
            problems.append("redis_retries must be >= 0")
        if self.history_max_backlog < 1:
            problems.append("history_max_backlog must be >= 1")
        if self.feature_memory_size < 0:
            problems.append("feature_memory_size must be >= 0")
        if self.refit_queue_size < 0:
            problems.append("refit_queue_size must be >= 0")
        if self.redis_mode not in ("standalone", "cluster"):
            problems.append(f"redis_mode must be standalone or cluster, got {self.redis_mode!r}")
        if self.redis_min_replica_acks < -1 or self.redis_replica_ack_timeout_ms < 1:
            problems.append("redis_min_replica_acks must be >= -1 and redis_replica_ack_timeout_ms >= 1")
        if not self.redis_key_prefix or ":" in self.redis_key_prefix:
            problems.append("redis_key_prefix must be non-empty and contain no ':'")
        if problems:
            raise ValueError("invalid gateway config: " + "; ".join(problems))

    @classmethod
    def load(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> GatewayConfig:
        """Defaults, overridden by PIAA_* variables of `environ`, overridden by `argv` flags.

        Raises ValueError for a malformed value or an unknown flag (naming the closest one).
        """
        parser = _StrictParser(add_help=False, allow_abbrev=False)
        add_arguments(parser)
        args = parser.parse_args(list(argv or []))
        return from_namespace(args, os.environ if environ is None else environ)

    def replace(self, **changes: Any) -> GatewayConfig:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)


class _StrictParser(argparse.ArgumentParser):
    """An argument parser that raises ValueError instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        unknown = [word for word in message.split() if word.startswith("--")]
        flags = [o for a in self._actions for o in a.option_strings]
        hints = [f"{u} (did you mean {m[0]}?)" for u in unknown if (m := closest(u.split("=")[0], flags))]
        raise ValueError(f"gateway config: {message}" + ("; " + ", ".join(hints) if hints else ""))


def closest(word: str, candidates: Sequence[str]) -> list[str]:
    """The candidate nearest to a mistyped `word`, if any is near (a list of at most one)."""
    return difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)


def _parse(kind: type, text: str, name: str) -> Any:
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{name}: {text!r} is not a boolean")
    try:
        return kind(text)
    except ValueError as err:
        raise ValueError(f"{name}: {text!r} is not a valid {kind.__name__}") from err


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _field_type(f: dataclasses.Field[Any]) -> type:
    return _TYPES[str(f.type)]


def from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    """The fields set by PIAA_<FIELD> variables, parsed to their types; raises ValueError when malformed.

    A PIAA_* variable that is neither a field nor read by another component (READ_ELSEWHERE) is logged
    as a warning naming the closest setting: a typo there would otherwise be silently ignored.
    """
    values = {}
    known = {ENV_PREFIX + f.name.upper(): f for f in fields(GatewayConfig)}
    for key, f in known.items():
        if key in environ:
            values[f.name] = _parse(_field_type(f), environ[key], key)
    for key in sorted(environ):
        if key.startswith(ENV_PREFIX) and key not in known and key not in READ_ELSEWHERE:
            near = closest(key, list(known))
            hint = f"; did you mean {near[0]}?" if near else ""
            log.warning("%s is not a gateway setting and is ignored%s", key, hint)
    return values


def field_docs() -> dict[str, str]:
    """Each field's docstring (the string literal under it in GatewayConfig), for --help."""
    tree = ast.parse(inspect.getsource(GatewayConfig))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in itertools.pairwise(body):
        named = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        if named and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = str(after.value.value)
    return docs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one --flag per config field (default None: unset flags do not override the environment)."""
    docs = field_docs()
    for f in fields(GatewayConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f)
        text = f"{docs.get(f.name, '')} [env {ENV_PREFIX}{f.name.upper()}, default {f.default!r}]"
        text = text.replace("%", "%%")
        if kind is bool:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            parser.add_argument(
                flag, dest=f.name, type=kind, default=None, metavar=kind.__name__.upper(), help=text
            )


def from_namespace(args: argparse.Namespace, environ: Mapping[str, str]) -> GatewayConfig:
    """The config from parsed flags (see add_arguments) over the environment over the defaults."""
    values = from_environ(environ)
    for f in fields(GatewayConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    if values.get("redis_password_file"):
        values["redis_url"] = with_password(values.get("redis_url", ""), values["redis_password_file"])
    return GatewayConfig(**values)


def with_password(url: str, password_file: str) -> str:
    """`url` with the password read from `password_file` (its trailing newline dropped, URL-quoted).

    Raises ValueError when the file cannot be read or is empty, when there is no url, or when the url
    already names a password (two sources of one secret: which one wins would be a guess).
    """
    if not url:
        raise ValueError("redis_password_file needs redis_url (the server to send the password to)")
    parts = urllib.parse.urlsplit(url)
    if parts.password is not None:
        raise ValueError("redis_url names a password and redis_password_file is set: keep one")
    try:
        password = Path(password_file).read_text().rstrip("\r\n")
    except OSError as err:
        raise ValueError(f"redis_password_file: cannot read {password_file}: {err.strerror}") from err
    if not password:
        raise ValueError(f"redis_password_file: {password_file} is empty")
    user, _, host = parts.netloc.rpartition("@")
    netloc = f"{user}:{urllib.parse.quote(password, safe='')}@{host}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
