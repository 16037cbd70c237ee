"""The rollout state in Redis (`<p>:rollout`): the feature space every gateway serves, and every space that
holds profiles (so a delete removes all of a user's profiles). Written only by the migration job's switch.

Fields (format.md, "Rollout"): `active` (the space; absent = never switched: each gateway serves its
Triton model's own space), `previous` (the space before the last switch), `spaces` (comma-separated,
every space profiles were written in), `switched_at` (Unix seconds).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from piaa_personalization.store import format as fmt
from piaa_personalization.store.redis_store import RedisProfileStore


@dataclass(frozen=True)
class Rollout:
    """What `<p>:rollout` says; `active` None when no switch was ever made."""

    active: str | None
    previous: str | None
    spaces: tuple[str, ...]
    switched_at: float


def _text(raw: dict[bytes | str, bytes | str], name: str) -> str | None:
    for key in (name, name.encode()):
        if key in raw:
            value = raw[key]
            return value.decode() if isinstance(value, bytes) else value
    return None


async def read(store: RedisProfileStore) -> Rollout:
    """The current rollout state (one HGETALL). Raises StoreUnavailable, StoreDataError."""
    async with store.conn.guard():
        raw = await store.client.hgetall(store.keys.rollout)
    spaces = tuple(s for s in (_text(raw, "spaces") or "").split(",") if s)
    try:
        return Rollout(
            _text(raw, "active"), _text(raw, "previous"), spaces, float(_text(raw, "switched_at") or 0.0)
        )
    except ValueError as err:
        raise fmt.StoreDataError(f"unreadable rollout state: {err}") from err


async def switch(store: RedisProfileStore, to: str, also: tuple[str, ...] = ()) -> Rollout:
    """Makes `to` the space every gateway serves (they follow within their poll interval); `also` names
    further spaces holding profiles. Returns the new state."""
    fmt.Keys(store.config.key_prefix, to)  # validates the name
    before = await read(store)
    spaces = tuple(dict.fromkeys([*before.spaces, *also, to]))
    previous = before.active if before.active and before.active != to else before.previous
    mapping = {"active": to, "spaces": ",".join(spaces), "switched_at": repr(time.time())}
    if previous:
        mapping["previous"] = previous
    async with store.conn.guard():
        await store.client.hset(store.keys.rollout, mapping=mapping)  # type: ignore[arg-type]
    return await read(store)
