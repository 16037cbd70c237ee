"""Population priors cached in a gateway process, dropped when the change channel announces a new one.

A prior is read on every AddRatings (the fit needs it), so each process keeps the tenants' priors for a
short TTL (GatewayConfig.prior_cache_ttl_s). Storing a prior (`RedisProfileStore.put_prior`, the background
relearning) publishes `prior:<tenant>:<layout> <learned_at ms>` on the change channel; every process's
subscriber hands it to `handle`, which drops that tenant's entries, so the next fit reads the new prior
instead of fitting under the old one until the TTL ends. A lost subscription clears every entry.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from piaa_personalization.model.residual import Prior
from piaa_personalization.store.format import parse_prior_change


class PriorCache:
    """(tenant, layout key) -> prior, each trusted for the caller's max age, dropped on a change message."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], tuple[float, Prior]] = {}
        self._generation: dict[str, int] = {}
        self.changes_seen = 0
        """Prior change messages handled (for tests and metrics)."""

    async def get(
        self, tenant: str, layout_key: str, max_age_s: float, read: Callable[[], Awaitable[Prior]]
    ) -> Prior:
        """The cached prior when younger than `max_age_s`, else `read()`'s, cached unless a change of the
        tenant's prior arrived while it was being read (it may be the older one)."""
        entry = self._entries.get((tenant, layout_key))
        if entry is not None and time.monotonic() - entry[0] < max_age_s:
            return entry[1]
        generation = self._generation.get(tenant, 0)
        prior = await read()
        if self._generation.get(tenant, 0) == generation:
            self._entries[(tenant, layout_key)] = (time.monotonic(), prior)
        return prior

    def drop(self, tenant: str) -> None:
        """Forgets the tenant's priors (every layout), and any read of them in flight."""
        self._generation[tenant] = self._generation.get(tenant, 0) + 1
        for key in [k for k in self._entries if k[0] == tenant]:
            del self._entries[key]

    def clear(self) -> None:
        """Forgets every prior (the subscription was lost: changes may have been missed)."""
        for tenant in {k[0] for k in self._entries} | set(self._generation):
            self.drop(tenant)

    def handle(self, message: bytes | str) -> None:
        """Applies one message of the change channel (profile changes are ignored)."""
        change = parse_prior_change(message)
        if change is not None:
            self.changes_seen += 1
            self.drop(change[0])
