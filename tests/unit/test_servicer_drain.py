"""The servicer's draining flag, step by step on one event loop (no network): what the integration test
(tests/integration/test_consistency_drain.py) cannot place from outside, because the gateway stops
taking calls right after it drains. A handler that starts after drain() refuses its call; a stream whose
reader drain() cancelled before the reader ever ran still ends, with UNAVAILABLE, instead of waiting
forever for answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest

from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_personalization.api.servicer import DRAINING, STREAM_DRAINED, PersonalizationServicer
from piaa_personalization.config import GatewayConfig
from piaa_personalization.core.service import PersonalizationService
from piaa_personalization.errors import ShuttingDown


class Context:
    """What the servicer reads of a grpc.aio.ServicerContext: no metadata, no deadline."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def time_remaining(self) -> float | None:
        return None


def servicer() -> PersonalizationServicer:
    # No service: a refused call must touch nothing of it (an AttributeError here would say it did).
    return PersonalizationServicer(cast(PersonalizationService, None), GatewayConfig())


def context() -> grpc.aio.ServicerContext:
    return cast(grpc.aio.ServicerContext, Context())


async def silent() -> AsyncIterator[Any]:
    """A request stream whose client sends nothing yet."""
    await asyncio.Event().wait()
    yield pb.ScoreRequest()  # never reached


async def test_after_drain_every_new_call_and_stream_is_refused_before_anything_is_done() -> None:
    s = servicer()
    s.drain()
    assert s.draining
    with pytest.raises(ShuttingDown, match=DRAINING):
        await s.Score(pb.ScoreRequest(user_id="u"), context())
    with pytest.raises(ShuttingDown, match=DRAINING):
        await s.GetProfile(pb.GetProfileRequest(user_id="u"), context())
    with pytest.raises(ShuttingDown, match=DRAINING):
        await anext(s.ScoreStream(silent(), context()))
    assert ShuttingDown.status == "UNAVAILABLE"


async def test_a_stream_whose_reader_is_cancelled_before_it_ran_ends_with_unavailable() -> None:
    s = servicer()
    first = asyncio.ensure_future(anext(s.ScoreStream(silent(), context())))
    # One loop step: the handler runs up to its first wait and schedules its reader, which has not run.
    await asyncio.sleep(0)
    assert not first.done()
    s.drain()
    with pytest.raises(ShuttingDown, match=STREAM_DRAINED):
        await asyncio.wait_for(first, 10)
