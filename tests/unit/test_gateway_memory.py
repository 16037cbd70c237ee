"""The worker's memories of the hot path: the bounded LRU and SHA-256 digests remembered by a keyed hash."""

from __future__ import annotations

import hashlib

from piaa_personalization.core.memory import DIGEST_MEMO_MIN_BYTES, DigestMemo, Lru


def test_lru_forgets_the_least_recently_used_and_size_zero_keeps_nothing() -> None:
    lru: Lru[int] = Lru(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # "b" is now the oldest
    lru.put("c", 3)
    assert (lru.get("a"), lru.get("b"), lru.get("c"), len(lru)) == (1, None, 3, 2)
    off: Lru[int] = Lru(0)
    off.put("a", 1)
    assert off.get("a") is None and len(off) == 0


def test_digest_memo_gives_sha256_for_new_repeated_and_small_payloads() -> None:
    memo = DigestMemo(2)
    big = [bytes([k]) * (DIGEST_MEMO_MIN_BYTES + k) for k in range(3)]
    small = b"tiny image"
    for data in [*big, big[0], big[2], small, small]:
        assert memo.sha256_hex(data) == hashlib.sha256(data).hexdigest()
    # Payloads that differ in one byte (same length) get their own digests, remembered or not.
    twin = bytearray(big[1])
    twin[-1] ^= 1
    assert memo.sha256_hex(bytes(twin)) == hashlib.sha256(bytes(twin)).hexdigest()
    assert memo.sha256_hex(big[1]) == hashlib.sha256(big[1]).hexdigest()


def test_digest_memo_serves_a_repeat_by_its_key_without_hashing_it_again() -> None:
    memo = DigestMemo(4)
    data = b"\xff\xd8" + bytes(range(256)) * 64
    assert memo.sha256_hex(data) == hashlib.sha256(data).hexdigest()
    # Overwrite the remembered digest: a repeat returns what the memo holds, so no SHA-256 ran.
    memo._memo.put(memo.key(data), "remembered")
    assert memo.sha256_hex(bytes(data)) == "remembered"
    assert DigestMemo(0).sha256_hex(data) == hashlib.sha256(data).hexdigest()


def test_memo_keys_are_secret_per_memo_and_tell_apart_every_byte() -> None:
    first, second = DigestMemo(4), DigestMemo(4)
    data = bytes(range(256)) * 64
    assert first.key(data) == first.key(bytes(data)) and len(first.key(data)) == 16
    assert first.key(data) != second.key(data)  # another worker, another key: nothing to precompute
    keys = {first.key(data)}
    for i in range(0, len(data), 997):  # one flipped bit anywhere, or one byte more or less
        flipped = bytearray(data)
        flipped[i] ^= 1 << (i % 8)
        keys.add(first.key(bytes(flipped)))
    keys |= {first.key(data[:-1]), first.key(data + b"\x00")}
    assert len(keys) == 1 + len(range(0, len(data), 997)) + 2
