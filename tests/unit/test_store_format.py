"""The store's key names and encodings (pure; the Redis side is in tests/integration/test_store*.py)."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

from piaa_personalization.model.residual import FeatureLayout, Prior, RatingScale, SufficientStats, fit
from piaa_personalization.store import format as fmt

DIGEST = hashlib.sha256(b"photo").hexdigest()


def record(**kw: object) -> fmt.RatingRecord:
    args: dict[str, object] = {
        "digest": DIGEST,
        "value": 4.5,
        "scale": RatingScale.STARS_1_5,
        "outputs": np.linspace(-1, 1, 85, dtype=np.float32),
        "time": 1_700_000_000.25,
    }
    args.update(kw)
    return fmt.RatingRecord(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("user", ["alice", "a:b", "x}:ratings", "{evil}", "*", "ü ser/ñ?[]", "%41"])
def test_user_keys_share_a_tag_and_round_trip(user: str) -> None:
    keys = fmt.Keys("piaa")
    tag = keys.tag("acme", user)
    assert keys.parse_tag(tag) == ("acme", user)
    profile, ratings = keys.user_keys("acme", user)
    assert profile == f"piaa:{{{tag}}}:profile" and ratings == f"piaa:{{{tag}}}:ratings"
    # The hash tag (first '{' to the next '}') is the whole tag: no id can cut it short.
    assert profile[profile.index("{") + 1 : profile.index("}")] == tag
    assert not set(tag.partition(":u:")[2]) & set(":{}*?[]\\ ")
    assert keys.user_of(profile) == user


def test_distinct_users_never_share_keys() -> None:
    keys = fmt.Keys()
    users = ["a", "a:b", "a%3Ab", "x}:ratings", "x", "A", "a b", "a+b"]
    all_keys = [k for u in users for k in keys.user_keys("t", u)]
    assert len(set(all_keys)) == len(all_keys)
    assert keys.user_keys("t1", "a") != keys.user_keys("t2", "a")


@pytest.mark.parametrize("bad", ["", "a:b", "a b", "x" * 65, "t{1}", "*"])
def test_bad_tenants_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        fmt.Keys().profile(bad, "u")


def test_other_keys_and_change_messages() -> None:
    keys = fmt.Keys("p1")
    assert keys.features("fs1", DIGEST) == f"p1:feat:fs1:{DIGEST}"
    assert keys.prior("acme", FeatureLayout()) == "p1:{t:acme}:prior:fs1/paper20"
    assert keys.profile_pattern("acme") == "p1:{t:acme:u:*}:profile"
    assert fmt.parse_change(f"{keys.tag('acme', 'a b:c')} 7".encode()) == ("acme", "a b:c", 7)
    with pytest.raises(ValueError):
        keys.features("fs1", DIGEST.upper())
    with pytest.raises(ValueError):
        fmt.Keys("bad prefix")
    with pytest.raises(ValueError):
        keys.tag("acme", "")


def outputs_like_the_heads(rng: np.random.Generator) -> np.ndarray:
    """Packed head outputs in the ranges the real heads produce (generic in (0, 1), attributes in [-1, 1],
    content probabilities, an embedding of norm ~4.6)."""
    return np.r_[
        rng.uniform(0.15, 0.95),
        rng.uniform(-1, 1, 10),
        rng.dirichlet(np.full(10, 0.3)),
        rng.normal(0, 0.6, 64),
    ].astype(np.float32)


def test_rating_record_round_trip_and_corruption() -> None:
    r = record(outputs=outputs_like_the_heads(np.random.default_rng(0)))
    raw = fmt.encode_rating(r)
    assert len(raw) == 43 + 3 + 90 == 136
    back = fmt.decode_rating(raw)
    assert (back.digest, back.value, back.scale, back.fs_version, back.time) == (
        r.digest, r.value, r.scale, r.fs_version, 1_700_000_000.0
    )  # fmt: skip
    np.testing.assert_array_equal(back.outputs, fmt.quantized(r.outputs))
    assert back.unit == pytest.approx(0.875)
    for broken in (raw[:40], raw[:-4], raw + b"x", b"3" + raw[1:], b"1" + raw[1:]):
        with pytest.raises(fmt.StoreDataError):
            fmt.decode_rating(broken)


def test_rating_encoding_error_bounds() -> None:
    """Each group of head outputs within its stated bound: generic float16, attributes and embedding int8
    of their max |value| / 127, content 1/255."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        out = outputs_like_the_heads(rng)
        back = fmt.quantized(out)
        err = np.abs(back - out)
        assert err[0] <= 2.0**-11 * abs(out[0]) + 1e-7
        assert np.all(err[1:11] <= np.abs(out[1:11]).max() / 254 * 1.002 + 1e-7)
        assert np.all(err[11:21] <= 1 / 510 + 1e-7)
        assert np.all(err[21:] <= np.abs(out[21:]).max() / 254 * 1.002 + 1e-7)
    np.testing.assert_array_equal(fmt.quantized(np.zeros(85, np.float32)), np.zeros(85, np.float32))
    with pytest.raises(ValueError):
        fmt.encode_rating(record(outputs=np.r_[0.5, np.zeros(10), np.full(10, 1.5), np.zeros(64)]))
    with pytest.raises(ValueError):
        fmt.encode_rating(record(outputs=np.r_[0.5, np.full(10, 1e6), np.zeros(74)]))


def test_format1_rating_is_read() -> None:
    """A rating written by format 1's encoder (as it was, below) reads back exactly."""
    r = record()
    fs = r.fs_version.encode()
    head = struct.pack("<cBdd32sB", b"1", int(r.scale), r.value, r.time, bytes.fromhex(r.digest), len(fs))
    raw = head + fs + r.outputs.astype("<f4").tobytes()
    back = fmt.decode_rating(raw)
    assert (back.digest, back.value, back.scale, back.fs_version, back.time) == (
        r.digest, r.value, r.scale, r.fs_version, r.time
    )  # fmt: skip
    np.testing.assert_array_equal(back.outputs, r.outputs)
    with pytest.raises(fmt.StoreDataError):
        fmt.decode_rating(raw[:-4])


def test_rating_record_validation() -> None:
    with pytest.raises(ValueError):
        record(digest="abc")
    with pytest.raises(ValueError):
        record(outputs=np.zeros(84, np.float32))
    with pytest.raises(ValueError):
        record(outputs=np.full(85, np.nan, np.float32))
    with pytest.raises(ValueError):
        record(scale=9)


def test_feature_cache_value() -> None:
    row = np.arange(85, dtype=np.float32) / 7
    raw = fmt.encode_features(row)
    assert len(raw) == 340
    np.testing.assert_array_equal(fmt.decode_features(raw), row)
    with pytest.raises(fmt.StoreDataError):
        fmt.decode_features(raw[:-1])


def test_format1_profile_decoding() -> None:
    assert fmt.decode_profile("t", "u", {}) is None
    assert fmt.decode_lean("t", "u", None, None, None) is None
    fields: dict[str, bytes | None] = {
        "format": b"1",
        "layout": b"fs1/paper20",
        "weights": np.arange(21, dtype="<f4").tobytes(),
        "num_ratings": b"3",
        "n": b"3",
        "covers": b"3",
        "version": b"2",
        "updated_at": b"12.5",
        "alpha": b"40.0",
        "lam": b"2.0",
    }
    p = fmt.decode_profile("t", "u", fields)
    assert p is not None and p.is_current(FeatureLayout()) and not p.is_current(FeatureLayout(True))
    assert not p.is_current(FeatureLayout(fs_version="fs2")) and p.feature_space_version == "fs1"
    assert (p.num_ratings, p.version, p.updated_at, p.stats) == (3, 2, 12.5, None)
    pending = fmt.decode_profile("t", "u", {"num_ratings": b"2", "format": b"1"})
    assert pending is not None and pending.layout_key is None and not pending.is_current(FeatureLayout())
    with pytest.raises(fmt.StoreDataError):
        fmt.decode_profile("t", "u", {**fields, "format": b"3"})
    with pytest.raises(fmt.StoreDataError):
        fmt.decode_profile("t", "u", {**fields, "weights": b"abc"})
    with pytest.raises(fmt.StoreDataError):
        fmt.decode_profile("t", "u", {**fields, "num_ratings": b"x"})


def test_format2_profile_round_trip() -> None:
    rng = np.random.default_rng(2)
    layout = FeatureLayout()
    x = rng.uniform(-1, 1, (30, layout.dim))
    x[:, 0] = 1
    stats = SufficientStats.from_data(x, rng.normal(0, 0.2, 30))
    post = fit(stats, Prior.zero(layout.dim))
    pairs = fmt.encode_fit(layout, stats, post, 99.5, 31)
    fields: dict[str, bytes | None] = {
        str(k): v if isinstance(v, bytes) else v.encode()
        for k, v in zip(pairs[::2], pairs[1::2], strict=True)
    }
    assert set(fields) == {"format", "stats", "lean"} and fields["format"] == b"2"
    assert len(fields["stats"] or b"") == 12 + 4 * (231 + 21)
    fields |= {
        "num_ratings": b"31",
        "version": b"5",
        "layout": b"fs1/paper20",
        "covers": b"31",
        "prior_at": b"0.0",
        "epoch": b"e",
    }
    assert set(fields) == set(fmt.PROFILE_FIELDS)
    full = fmt.decode_profile("t", "u", fields, full=True)
    assert full is not None and full.stats is not None and full.is_current(layout)
    assert (full.num_ratings, full.n, full.covers, full.version, full.updated_at) == (31, 30, 31, 5, 99.5)
    assert full.stats.n == 30 and full.stats.yy == stats.yy
    assert full.stats.gram[0, 0] == 30  # exact in float32: fit() tells the intercept column by it
    np.testing.assert_allclose(full.stats.gram, stats.gram, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(full.stats.moment, stats.moment, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fit(full.stats, Prior.zero(21)).mean, post.mean, rtol=1e-3, atol=1e-5)
    np.testing.assert_array_equal(full.weights, post.mean.astype(np.float32))  # type: ignore[arg-type]
    lean = fmt.decode_profile("t", "u", fields)
    assert lean is not None and lean.stats is None
    with pytest.raises(fmt.StoreDataError):
        fmt.decode_profile("t", "u", {**fields, "stats": (fields["stats"] or b"")[:-4]}, full=True)


def test_lean_profile_round_trip() -> None:
    weights = np.linspace(-1, 1, 21, dtype=np.float32)
    lean = fmt.encode_lean("fs1/paper20", weights, n=7, covers=9, updated_at=123.5, alpha=40.0, lam=2.5)
    p = fmt.decode_lean("t", "u", lean, b"9", b"4")
    assert p is not None and p.is_current(FeatureLayout()) and p.stats is None
    assert (p.n, p.covers, p.num_ratings, p.version, p.updated_at, p.alpha, p.lam) == (
        7,
        9,
        9,
        4,
        123.5,
        40.0,
        2.5,
    )
    np.testing.assert_array_equal(p.weights, weights)  # type: ignore[arg-type]
    pending = fmt.decode_lean("t", "u", None, b"3", None)
    assert pending is not None and pending.layout_key is None and not pending.is_current(FeatureLayout())
    assert fmt.decode_lean("t", "u", b"1" + lean[1:], b"9", b"4") is not None  # format 1: same layout
    for broken in (lean[:10], lean[:-1], b"3" + lean[1:]):
        with pytest.raises(fmt.StoreDataError):
            fmt.decode_lean("t", "u", broken, b"9", b"4")


def test_prior_round_trip() -> None:
    rng = np.random.default_rng(0)
    prior = Prior.from_users(rng.normal(size=(30, 21)))
    enc = fmt.encode_prior(prior)
    back = fmt.decode_prior(21, {k: v if isinstance(v, bytes) else v.encode() for k, v in enc.items()})
    np.testing.assert_array_equal(back.mean, prior.mean)
    np.testing.assert_array_equal(back.precision, prior.precision)
    assert (back.lam0, back.alpha0, back.n_users, back.lam_strength) == (
        prior.lam0, prior.alpha0, 30, prior.lam_strength
    )  # fmt: skip
    with pytest.raises(fmt.StoreDataError):
        fmt.decode_prior(85, {k: v if isinstance(v, bytes) else v.encode() for k, v in enc.items()})
