"""The store's key names and value encodings (the code side of format.md), and its errors.

Pure: no I/O. Every number is little-endian; every decoder checks sizes and raises StoreDataError on
anything it does not recognise, so a corrupt or foreign value is never applied as weights.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

import numpy as np
from numpy.typing import NDArray

from piaa_client.features import ATTRIBUTES, EMBEDDING_DIM, FEATURE_SPACE_VERSION, NUM_CONTENT_CLUSTERS
from piaa_personalization.model.residual import (
    PACKED_DIM,
    FeatureLayout,
    Hyper,
    Posterior,
    Prior,
    RatingScale,
    SufficientStats,
    fit,
    rating_to_unit,
)
from piaa_personalization.store import format1

F32 = NDArray[np.float32]
FORMAT = b"2"
"""Version of the profile and rating encodings below; bumped on any incompatible change. Format-1 values
are still read (format1.py); writes are format 2."""
PRIOR_FORMAT = b"1"
"""Version of the prior hash (unchanged by format 2)."""

BASE_SPACE = "fs1"
"""The first feature space: its profiles keep the key without a space suffix (Keys.profile_suffix)."""

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_USER_SAFE = "-._~@+="  # besides letters and digits: no ':', braces or glob characters survive quoting


class StoreError(Exception):
    """A store operation failed; `retryable` says whether trying again later may succeed."""

    retryable = False


class StoreUnavailable(StoreError):
    """Redis could not be reached or did not answer in time (gRPC UNAVAILABLE; retryable)."""

    retryable = True


class StoreDataError(StoreError):
    """A stored value is not in a format this code reads (gRPC INTERNAL)."""


class ProfileDeleted(StoreError):
    """add_ratings appended, then the user was deleted before the fit was committed: none of the ratings
    was kept (and the call's receipt went with them), so sending them again records them in a new
    profile (gRPC ABORTED)."""


def validate_tenant(tenant: str) -> str:
    """Returns the tenant id; raises ValueError unless it is 1-64 of [A-Za-z0-9_.-]."""
    if not isinstance(tenant, str) or not _NAME.match(tenant):
        raise ValueError(f"tenant ids are 1-64 of [A-Za-z0-9_.-], got {tenant!r}")
    return tenant


def check_digest(digest: str) -> str:
    """Returns the digest; raises ValueError unless it is lower-case hex SHA-256 (64 characters)."""
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise ValueError(f"an image digest is 64 lower-case hex characters, got {digest!r}")
    return digest


@functools.lru_cache(maxsize=16_384)
def _tag(tenant: str, user_id: str) -> str:
    # Remembered: every scoring call names its users, and quoting costs more than the lookup.
    return f"t:{validate_tenant(tenant)}:u:{quote(user_id, safe=_USER_SAFE)}"


class Keys:
    """Key names. One user's keys share the hash tag {t:<tenant>:u:<user>} (one Redis Cluster slot)."""

    def __init__(self, prefix: str = "piaa", space: str = BASE_SPACE) -> None:
        if not _NAME.match(prefix):
            raise ValueError(f"key prefix must be 1-64 of [A-Za-z0-9_.-], got {prefix!r}")
        if not _NAME.match(space):
            raise ValueError(f"bad feature-space version {space!r}")
        self.prefix = prefix
        self.space = space
        """The feature space whose profile keys profile() names (see profile_suffix)."""
        self.changes = f"{prefix}:changes"
        """Pub/sub channel: '<tag> <version>' after each profile commit, '<tag> -1' after a delete,
        'prior:<tenant>:<layout> <learned_at in ms>' after a tenant's prior changed (prior_change)."""
        self.rollout = f"{prefix}:rollout"
        """HASH: which feature space the gateways serve and which spaces hold profiles (rollout.py)."""

    @staticmethod
    def tag(tenant: str, user_id: str) -> str:
        """'t:<tenant>:u:<user>' with the user id percent-encoded (UTF-8), so ':', braces and glob
        characters in ids can neither break the hash tag nor collide with another user's keys."""
        if not isinstance(user_id, str) or not user_id or not isinstance(tenant, str):
            raise ValueError("a user id is a non-empty string")
        return _tag(tenant, user_id)

    @staticmethod
    def parse_tag(tag: str) -> tuple[str, str]:
        """Inverse of tag(): (tenant, user_id)."""
        m = re.match(r"^t:([A-Za-z0-9_.-]+):u:(.+)$", tag)
        if not m:
            raise ValueError(f"not a user tag: {tag!r}")
        return m.group(1), unquote(m.group(2))

    @staticmethod
    def profile_suffix(space: str) -> str:
        """'' for BASE_SPACE (profiles written before spaces were served side by side keep their key),
        ':<fs>' for every other feature space."""
        return "" if space == BASE_SPACE else f":{space}"

    def profile(self, tenant: str, user_id: str, space: str | None = None) -> str:
        """The user's profile in feature space `space` (default: this Keys' space)."""
        suffix = self.profile_suffix(self.space if space is None else space)
        return f"{self.prefix}:{{{self.tag(tenant, user_id)}}}:profile{suffix}"

    def ratings(self, tenant: str, user_id: str) -> str:
        return f"{self.prefix}:{{{self.tag(tenant, user_id)}}}:ratings"

    def user_keys(self, tenant: str, user_id: str, spaces: Iterable[str] = ()) -> list[str]:
        """Every key that holds this user's data: the profile in this space and in each of `spaces`,
        and the ratings."""
        names = dict.fromkeys([self.space, *spaces])
        return [*(self.profile(tenant, user_id, s) for s in names), self.ratings(tenant, user_id)]

    def profile_pattern(self, tenant: str) -> str:
        """SCAN pattern of a tenant's profile keys in this space."""
        return f"{self.prefix}:{{t:{validate_tenant(tenant)}:u:*}}:profile{self.profile_suffix(self.space)}"

    def all_profiles_pattern(self) -> str:
        """SCAN pattern of every tenant's profile keys in this space."""
        return f"{self.prefix}:{{t:*:u:*}}:profile{self.profile_suffix(self.space)}"

    def user_of(self, profile_key: str) -> str:
        """The user id inside a profile key."""
        return self.owner_of(profile_key)[1]

    def owner_of(self, profile_key: str) -> tuple[str, str]:
        """(tenant, user id) of a profile key of any space."""
        tag = profile_key[len(self.prefix) + 2 : profile_key.rindex("}:profile")]
        return self.parse_tag(tag)

    def features(self, fs_version: str, digest: str) -> str:
        if not _NAME.match(fs_version):
            raise ValueError(f"bad feature-space version {fs_version!r}")
        return f"{self.prefix}:feat:{fs_version}:{check_digest(digest)}"

    def prior(self, tenant: str, layout: FeatureLayout) -> str:
        return f"{self.prefix}:{{t:{validate_tenant(tenant)}}}:prior:{layout.key}"

    def request(self, tenant: str, user_id: str, request_id: str) -> str:
        """The receipt of an idempotent add_ratings, in the user's hash slot (the append script writes it)."""
        return f"{self.prefix}:{{{self.tag(tenant, user_id)}}}:req:{check_request_id(request_id)}"

    def call(self, tenant: str, user_id: str, call_id: str) -> str:
        """The call key of one add_ratings call (its id made by the store before the first send): a
        resend of its append finds it and records nothing (format.md, "Resends")."""
        return f"{self.prefix}:{{{self.tag(tenant, user_id)}}}:call:{check_request_id(call_id)}"


RECEIPT_TTL_S = 24 * 3600
"""How long a request id is remembered: a repeat within it records nothing."""

CALL_TTL_S = 300
"""How long a call key lives: the time within which a resend of the same append records nothing. The
connection resends within one call (socket timeout x (retries + 1) plus backoff: 6.5 s by default)."""


def check_request_id(request_id: str) -> str:
    """Returns the id; raises ValueError unless it is 1-64 of [A-Za-z0-9_.-] (a UUID fits)."""
    if not isinstance(request_id, str) or not _NAME.match(request_id):
        raise ValueError(f"a request id is 1-64 of [A-Za-z0-9_.-], got {request_id!r}")
    return request_id


@dataclass(frozen=True)
class Receipt:
    """What an idempotent add_ratings leaves under its request id: the hash of the ratings it recorded
    (payload_hash) and the length of the user's ratings list right after its append."""

    payload_hash: str
    num_ratings: int


def payload_hash(ratings: Iterable[tuple[str, float, int]]) -> str:
    """Hex SHA-256 of (digest, value as given, scale number) per rating, in order: two requests with the
    same hash recorded the same ratings."""
    h = hashlib.sha256()
    for digest, value, scale in ratings:
        h.update(f"{check_digest(digest)} {float(value)!r} {int(scale)}\n".encode())
    return h.hexdigest()


RECEIPT_FORMAT = "1"
"""Version of the receipt value (unchanged by format 2)."""


def receipt_prefix(hash_hex: str) -> str:
    """The receipt value before the list length, which the append script adds: '1:<payload hash>:'."""
    return f"{RECEIPT_FORMAT}:{hash_hex}:"


def decode_receipt(raw: bytes | str) -> Receipt:
    """A stored receipt; raises StoreDataError when it is not '1:<64 hex>:<length>'."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    version, _, rest = text.partition(":")
    hash_hex, _, length = rest.partition(":")
    if version != RECEIPT_FORMAT or not _DIGEST.match(hash_hex) or not length.isdigit():
        raise StoreDataError(f"unreadable request receipt {text[:80]!r}")
    return Receipt(hash_hex, int(length))


class AlreadyRecorded(Exception):
    """add_ratings with a request id seen within RECEIPT_TTL_S: nothing was recorded now. `receipt` is
    the first call's (compare its payload_hash to tell a retry from a reused id)."""

    def __init__(self, receipt: Receipt) -> None:
        super().__init__(f"request already recorded ({receipt.num_ratings} ratings after it)")
        self.receipt = receipt


def parse_change(message: bytes | str) -> tuple[str, str, int]:
    """A message of the `changes` channel -> (tenant, user_id, version); version -1 = deleted."""
    text = message.decode() if isinstance(message, bytes) else message
    tag, _, version = text.rpartition(" ")
    tenant, user = Keys.parse_tag(tag)
    return tenant, user, int(version)


PRIOR_CHANGE = "prior:"
"""First word's prefix of a prior change on the `changes` channel (user tags start with 't:')."""


def prior_change(tenant: str, layout_key: str, learned_at: float) -> str:
    """The message a new prior of (tenant, layout) publishes on the `changes` channel:
    'prior:<tenant>:<layout key> <learned_at in whole ms>'. The last word is an integer, as in a profile
    change, so a listener that reads '<name> <version>' takes it for a name it never cached."""
    return f"{PRIOR_CHANGE}{validate_tenant(tenant)}:{layout_key} {int(learned_at * 1000)}"


def parse_prior_change(message: bytes | str) -> tuple[str, str, float] | None:
    """(tenant, layout key, learned_at) of a prior change message; None for any other message."""
    text = message.decode() if isinstance(message, bytes) else message
    if not text.startswith(PRIOR_CHANGE):
        return None
    name, _, stamp = text[len(PRIOR_CHANGE) :].rpartition(" ")
    tenant, _, layout_key = name.partition(":")
    try:
        return validate_tenant(tenant), layout_key, int(stamp) / 1000
    except ValueError:
        return None


@dataclass(frozen=True)
class RatingRecord:
    """One rating as stored, append-only: the image digest, the value as given and its scale, when, and
    the image's packed head outputs [85] in feature space `fs_version` (so the profile can be refit)."""

    digest: str
    value: float
    scale: RatingScale
    outputs: F32
    fs_version: str = FEATURE_SPACE_VERSION
    time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        check_digest(self.digest)
        object.__setattr__(self, "scale", RatingScale(self.scale))
        out = np.asarray(self.outputs, dtype=np.float32).reshape(-1)
        if out.shape != (PACKED_DIM,) or not np.all(np.isfinite(out)):
            raise ValueError(f"a rating's head outputs are {PACKED_DIM} finite floats, got {out.shape}")
        object.__setattr__(self, "outputs", out)
        if not _NAME.match(self.fs_version):
            raise ValueError(f"bad feature-space version {self.fs_version!r}")

    @property
    def unit(self) -> float:
        """The value on [0, 1] (raises InvalidRating when out of its scale)."""
        return rating_to_unit(self.value, self.scale)


_RATING_HEAD = struct.Struct("<cBfI32sB")  # format, scale, value f32, time u32 s, raw digest, len(fs)
_NA, _NC = len(ATTRIBUTES), NUM_CONTENT_CLUSTERS
_BODY = struct.Struct(
    f"<ee{_NA}b{_NC}Be{EMBEDDING_DIM}b"
)  # generic, attr scale, attrs, content, emb scale, emb
RATING_BODY_BYTES = _BODY.size
"""Bytes of a format-2 rating's encoded head outputs (90 for 85 outputs: 340 as float32)."""
_F16_MAX = float(np.finfo(np.float16).max)


def _scale(values: NDArray[np.float32]) -> np.float16:
    """The float16 step base s >= max|values| (so values / s * 127 fits int8); 1 for all zeros."""
    top = float(np.max(np.abs(values))) if values.size else 0.0
    if top > _F16_MAX:
        raise ValueError(f"a head output of {top} does not fit the rating encoding")
    s = np.float16(top)
    if float(s) < top:
        s = np.nextafter(s, np.float16(np.inf))
    return s if s > 0 else np.float16(1.0)


def quantize_outputs(
    packed: F32,
) -> tuple[np.float16, np.float16, NDArray[np.int8], NDArray[np.uint8], np.float16, NDArray[np.int8]]:
    """One image's packed head outputs [85] as format 2 stores them: generic float16; attributes and
    embedding int8 times a float16 scale each (max |value| / 127); content probabilities uint8 in 1/255.
    Raises ValueError on content outside [0, 1] (they are probabilities) or values beyond float16."""
    out = np.asarray(packed, dtype=np.float32).reshape(PACKED_DIM)
    attrs, content, emb = out[1 : 1 + _NA], out[1 + _NA : 1 + _NA + _NC], out[1 + _NA + _NC :]
    if np.any(content < -1e-6) or np.any(content > 1 + 1e-6):
        raise ValueError("content outputs are probabilities in [0, 1]")
    if abs(float(out[0])) > _F16_MAX:
        raise ValueError(f"a generic score of {out[0]} does not fit the rating encoding")
    sa, se = _scale(attrs), _scale(emb)
    qa = np.clip(np.rint(attrs / np.float32(sa) * 127), -127, 127).astype(np.int8)
    qc = np.clip(np.rint(content * 255), 0, 255).astype(np.uint8)
    qe = np.clip(np.rint(emb / np.float32(se) * 127), -127, 127).astype(np.int8)
    return np.float16(out[0]), sa, qa, qc, se, qe


def _encode_body(packed: F32) -> bytes:
    g, sa, qa, qc, se, qe = quantize_outputs(packed)
    return _BODY.pack(g, sa, *qa.tolist(), *qc.tolist(), se, *qe.tolist())


def _decode_body(raw: bytes, at: int) -> F32:
    v = _BODY.unpack_from(raw, at)
    a0, c0, e0 = 2, 2 + _NA, 2 + _NA + _NC
    out = np.empty(PACKED_DIM, np.float32)
    out[0] = v[0]
    out[1 : 1 + _NA] = np.asarray(v[a0:c0], np.float32) * np.float32(v[1] / 127)
    out[1 + _NA : 1 + _NA + _NC] = np.asarray(v[c0:e0], np.float32) / np.float32(255)
    out[1 + _NA + _NC :] = np.asarray(v[e0 + 1 :], np.float32) * np.float32(v[e0] / 127)
    return out


def quantized(packed: F32) -> F32:
    """The head outputs [85] as a format-2 rating stores them (decode(encode(packed))): what a refit
    folds. Raises ValueError as quantize_outputs."""
    return _decode_body(_encode_body(packed), 0)


def encode_rating(r: RatingRecord) -> bytes:
    """A format-2 rating record (see format.md): value float32, time in whole seconds, head outputs in
    90 bytes (quantize_outputs). Raises ValueError on outputs that encoding cannot hold."""
    fs = r.fs_version.encode()
    when = min(max(round(r.time), 0), 2**32 - 1)
    head = _RATING_HEAD.pack(FORMAT, int(r.scale), r.value, when, bytes.fromhex(r.digest), len(fs))
    return head + fs + _encode_body(r.outputs)


def _record(values: tuple[str, float, int, F32, str, float]) -> RatingRecord:
    """A RatingRecord of (digest, value, scale number, outputs, fs version, time) as decoded."""
    # Written by encode_rating from a validated record: skip __post_init__'s checks (the hot path of a
    # refit reads every rating of a user).
    record = object.__new__(RatingRecord)
    digest, value, scale, outputs, fs, when = values
    for name, v in zip(_RECORD_FIELDS, (digest, value, RatingScale(scale), outputs, fs, when), strict=True):
        object.__setattr__(record, name, v)
    return record


def decode_rating(raw: bytes) -> RatingRecord:
    """A stored rating of format 2 or 1; raises StoreDataError on another format or a wrong size."""
    try:
        if raw[:1] == format1.FORMAT1:
            return _record(format1.unpack_rating(raw))
        fmt_, scale, value, when, digest, fs_len = _RATING_HEAD.unpack_from(raw)
        if fmt_ != FORMAT:
            raise StoreDataError(f"rating format {fmt_!r}, this code reads {FORMAT!r} and 1")
        at = _RATING_HEAD.size
        if len(raw) != at + fs_len + _BODY.size:
            raise StoreDataError(f"a rating record of {len(raw)} bytes")
        fs = raw[at : at + fs_len].decode()
        return _record((digest.hex(), value, scale, _decode_body(raw, at + fs_len), fs, float(when)))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise StoreDataError(f"unreadable rating record: {e}") from e


_RECORD_FIELDS = ("digest", "value", "scale", "outputs", "fs_version", "time")


def encode_features(packed_row: F32) -> bytes:
    return np.asarray(packed_row, dtype="<f4").reshape(PACKED_DIM).tobytes()


def decode_features(raw: bytes) -> F32:
    if len(raw) != 4 * PACKED_DIM:
        raise StoreDataError(f"cached features are {4 * PACKED_DIM} bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def _f64(raw: bytes | None, count: int, what: str) -> NDArray[np.float64]:
    if raw is None or len(raw) != 8 * count:
        raise StoreDataError(f"{what}: expected {count} float64")
    return np.frombuffer(raw, dtype="<f8").astype(np.float64)


def _pack_sym(matrix: NDArray[np.float64]) -> NDArray[np.float64]:
    """The upper triangle, row by row: A'A is symmetric, so half of it is all there is to store."""
    return matrix[np.triu_indices(matrix.shape[0])]


_STATS_HEAD = struct.Struct("<Id")  # n, yy


def encode_stats(stats: SufficientStats) -> bytes:
    """The `stats` field of format 2: n (uint32), yy (float64), then float32 x (D(D+1)/2 + D): the gram's
    upper triangle row by row and the moment."""
    body = np.concatenate([_pack_sym(stats.gram), stats.moment]).astype("<f4")
    return _STATS_HEAD.pack(stats.n, stats.yy) + body.tobytes()


def decode_stats2(dim: int, raw: bytes) -> SufficientStats:
    """Inverse of encode_stats for D = dim; raises StoreDataError on a wrong size."""
    tri = dim * (dim + 1) // 2
    if len(raw) != _STATS_HEAD.size + 4 * (tri + dim):
        raise StoreDataError(f"statistics of {len(raw)} bytes for D={dim}")
    n, yy = _STATS_HEAD.unpack_from(raw)
    body = np.frombuffer(raw, dtype="<f4", offset=_STATS_HEAD.size).astype(np.float64)
    return SufficientStats(format1.unpack_sym(body[:tri], dim), body[tri:], float(yy), int(n))


def decode_stats(
    dim: int, gram: bytes | None, moment: bytes | None, yy: bytes | None, n: bytes | None
) -> SufficientStats:
    """Format-1 statistics (gram, moment, yy, n fields); raises StoreDataError when malformed."""
    try:
        return format1.unpack_stats(dim, gram, moment, yy, n)
    except ValueError as e:
        raise StoreDataError(str(e)) from e


PROFILE_FIELDS = (
    "format", "epoch", "num_ratings", "version", "layout", "covers", "prior_at", "stats", "lean",
)  # fmt: skip
"""Every field of a format-2 profile hash."""


def encode_fit(
    layout: FeatureLayout, stats: SufficientStats, post: Posterior, now: float, covers: int
) -> list[bytes | str]:
    """Field/value pairs a commit writes (besides layout, covers and version, which the script sets):
    format, stats and lean."""
    weights = post.mean.astype("<f4")
    pairs: dict[str, bytes | str] = {
        "format": FORMAT,
        "stats": encode_stats(stats),
        "lean": encode_lean(
            layout.key, weights, n=stats.n, covers=covers, updated_at=now, alpha=post.alpha, lam=post.lam
        ),
    }
    return [x for kv in pairs.items() for x in kv]


_LEAN_HEAD = struct.Struct("<cqqdddB")  # format, n, covers, updated_at, alpha, lam, len(layout)

LEAN_FIELDS = ("lean", "num_ratings", "version")
"""What scoring reads per user (HMGET): the `lean` snapshot of the fit, the rating count, the version."""


def encode_lean(
    layout_key: str, weights: F32, *, n: int, covers: int, updated_at: float, alpha: float, lam: float
) -> bytes:
    """The fit in one value, so a batch read of many users is one short HMGET each (see format.md)."""
    key = layout_key.encode()
    head = _LEAN_HEAD.pack(FORMAT, n, covers, updated_at, alpha, lam, len(key))
    return head + key + np.asarray(weights, dtype="<f4").tobytes()


def decode_lean(
    tenant: str, user_id: str, lean: bytes | None, num_ratings: bytes | None, version: bytes | None
) -> Profile | None:
    """A lean profile (no statistics) from the LEAN_FIELDS; None when the user has no ratings. A format-1
    lean has the same layout with format byte '1'."""
    if not num_ratings:
        return None
    try:
        count, ver = int(num_ratings), int(version or 0)
        if lean is None:  # ratings stored, no fit committed yet: reads as stale
            return Profile(tenant, user_id, None, None, count, 0, 0, ver, 0.0)
        fmt_, n, covers, updated_at, alpha, lam, key_len = _LEAN_HEAD.unpack_from(lean)
        if fmt_ not in (FORMAT, format1.FORMAT1):
            raise StoreDataError(f"profile format {fmt_!r}, this code reads {FORMAT!r} and 1")
        at = _LEAN_HEAD.size + key_len
        if (len(lean) - at) % 4:
            raise StoreDataError("weights are not float32")
        weights = np.frombuffer(lean, dtype="<f4", offset=at).astype(np.float32)
        layout_key = lean[_LEAN_HEAD.size : at].decode()
        return Profile(tenant, user_id, layout_key, weights, count, n, covers, ver, updated_at, alpha, lam)
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise StoreDataError(f"unreadable profile of {user_id!r}: {e}") from e


@dataclass(frozen=True)
class Profile:
    """A user's stored profile. `layout_key` None means ratings are stored but no fit was committed yet;
    `stats` is only read by full reads (get_profile, iter_profiles, add_ratings)."""

    tenant: str
    user_id: str
    layout_key: str | None
    weights: F32 | None
    num_ratings: int
    n: int
    covers: int
    version: int
    updated_at: float
    alpha: float = math.nan
    lam: float = math.nan
    stats: SufficientStats | None = None

    @property
    def feature_space_version(self) -> str:
        """The feature space the weights were fitted in ('' when none)."""
        return (self.layout_key or "").partition("/")[0]

    def is_current(self, layout: FeatureLayout) -> bool:
        """Whether the weights may be applied under `layout` (same feature space and features)."""
        return self.layout_key == layout.key and self.weights is not None and len(self.weights) == layout.dim

    def posterior(self, prior: Prior, hyper: Hyper | None = None) -> Posterior:
        """The fitted posterior (with its covariance) from the statistics; needs a full read."""
        if self.stats is None:
            raise ValueError("this profile was read without statistics (use get_profile)")
        return fit(self.stats, prior, hyper)


def decode_profile(
    tenant: str, user_id: str, fields: dict[str, bytes | None], *, full: bool = False
) -> Profile | None:
    """A profile from its hash fields (format 2, or 1 via format1.py); None when the user has no ratings.
    The statistics only when `full`. Raises StoreDataError."""
    if not fields.get("num_ratings"):
        return None
    version = fields.get("format")
    try:
        if version == format1.FORMAT1:
            return Profile(tenant, user_id, **format1.profile_kwargs(fields, full=full))
        if version not in (None, FORMAT):
            raise StoreDataError(f"profile format {version!r}, this code reads {FORMAT!r} and 1")
        lean = decode_lean(tenant, user_id, fields.get("lean"), fields["num_ratings"], fields.get("version"))
        if lean is None or lean.weights is None or not full or fields.get("stats") is None:
            return lean
        stats = decode_stats2(len(lean.weights), fields["stats"])  # type: ignore[arg-type]
        return dataclasses.replace(lean, stats=stats)
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise StoreDataError(f"unreadable profile of {user_id!r}: {e}") from e


def encode_prior(prior: Prior) -> dict[str, bytes | str]:
    return {
        "format": PRIOR_FORMAT,
        "dim": str(prior.dim),
        "mean": prior.mean.astype("<f8").tobytes(),
        "precision": prior.precision.astype("<f8").tobytes(),
        "lam0": repr(prior.lam0),
        "alpha0": repr(prior.alpha0),
        "n_users": str(prior.n_users),
        "lam_strength": repr(prior.lam_strength),
        "updated_at": repr(prior.learned_at or time.time()),
    }


def decode_prior(dim: int, fields: dict[str, bytes | None]) -> Prior:
    """A prior from its hash fields; raises StoreDataError on another format or dimension."""
    try:
        if fields.get("format") != PRIOR_FORMAT or int(fields.get("dim") or b"0") != dim:
            raise StoreDataError(
                f"prior format/dim {fields.get('format')!r}/{fields.get('dim')!r} != 1/{dim}"
            )
        return Prior(
            _f64(fields.get("mean"), dim, "prior mean"),
            _f64(fields.get("precision"), dim * dim, "prior precision").reshape(dim, dim),
            float(fields.get("lam0") or "nan"),
            float(fields.get("alpha0") or "nan"),
            int(fields.get("n_users") or b"0"),
            float(fields.get("lam_strength") or "0"),
            float(fields.get("updated_at") or "0"),
        )
    except ValueError as e:
        raise StoreDataError(f"unreadable prior: {e}") from e
