"""The history outbox in Redis: one stream per Redis Cluster hash slot, fed by the append script.

A Lua script may only touch keys of one hash slot (Redis Cluster), and a user's keys live in the slot of
its tag `{t:<tenant>:u:<user>}`. So the outbox of a rating is the stream of that slot,
`<p>:{o:<hex>}:outbox`, where `<hex>` is the first hex number whose CRC16 lands in the same slot
(`slot_tag`). The append script XADDs to it in the same atomic step as the RPUSH: a rating and its
outbox entry are written, replicated and lost in a failover together (format.md, "History outbox").

Entry fields: `t` tenant, `u` user id (as given, not percent-encoded), `s` the rating's 0-based position
in the user's history (the ratings list's index at its append), `q` the request id ('' when none), `r`
the rating record (format.md's 136 bytes).
"""

from __future__ import annotations

import binascii
import functools

from piaa_personalization.store import format as fmt

SLOTS = 16384

DEFAULT_MAX_BACKLOG_PER_SLOT = 2000
"""Entries one slot's stream may hold before AddRatings for users of that slot is refused (UNAVAILABLE,
nothing written): the bound on Redis memory while the table cannot be written (docs/history.md)."""


def key_slot(tag: str) -> int:
    """Redis Cluster's slot of a hash tag (CRC16-XMODEM mod 16384, as redis.crc.key_slot)."""
    return binascii.crc_hqx(tag.encode(), 0) % SLOTS


@functools.cache
def _slot_tags() -> tuple[str, ...]:
    tags: dict[int, str] = {}
    i = 0
    while len(tags) < SLOTS:
        tag = f"o:{i:x}"
        tags.setdefault(key_slot(tag), tag)
        i += 1
    return tuple(tags[s] for s in range(SLOTS))


def slot_tag(slot: int) -> str:
    """The outbox hash tag `o:<hex>` of a slot (the smallest hex number that hashes there)."""
    return _slot_tags()[slot]


def stream_key(prefix: str, slot: int) -> str:
    """The outbox stream of a slot: `<p>:{o:<hex>}:outbox`."""
    return f"{prefix}:{{{slot_tag(slot)}}}:outbox"


def user_stream(prefix: str, tenant: str, user: str) -> str:
    """The outbox stream a user's ratings go to (the slot of the user's tag)."""
    return stream_key(prefix, key_slot(fmt.Keys.tag(tenant, user)))


def all_streams(prefix: str) -> list[str]:
    """Every slot's stream key (what a writer reads)."""
    return [stream_key(prefix, s) for s in range(SLOTS)]


def with_outbox(append_script: str) -> str:
    """The append script with the outbox: each RPUSH of a new rating is followed, in the same script, by
    an XADD of its entry to the stream passed as the last key; when that stream already holds ARGV[7]
    entries the script writes nothing and replies {-3}. The outbox arguments (ARGV[7..10]: the bound,
    tenant, user, request id) and key are taken off first, so the rest of the script reads KEYS and ARGV
    exactly as the script without the outbox does."""
    push = "  for i = 7, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end\n"
    if append_script.count(push) != 1:
        raise ValueError("the append script no longer has the RPUSH loop the outbox extends")
    head = (
        "local OB = table.remove(KEYS)\n"
        "local OB_CAP = tonumber(table.remove(ARGV, 7))\n"
        "local OB_T = table.remove(ARGV, 7)\n"
        "local OB_U = table.remove(ARGV, 7)\n"
        "local OB_Q = table.remove(ARGV, 7)\n"
    )
    pushed = (
        "  if redis.call('XLEN', OB) >= OB_CAP then return {-3} end\n"
        "  for i = 7, #ARGV do\n"
        "    local n = redis.call('RPUSH', KEYS[2], ARGV[i])\n"
        "    redis.call('XADD', OB, '*', 't', OB_T, 'u', OB_U, 's', n - 1, 'q', OB_Q, 'r', ARGV[i])\n"
        "  end\n"
    )
    return head + append_script.replace(push, pushed)
