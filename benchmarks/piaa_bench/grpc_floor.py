"""The floor under the gateway's hot path: a grpc.aio server that answers Score with canned scores.

    python -m piaa_bench.grpc_floor --port 0      # prints "gateway serving on HOST:PORT"

It parses each ScoreRequest and answers one ImageScore per image, of the size the gateway sends (digest,
scores, 10 named attributes, 10 content values), built once at start: no hashing, no lookups, no
personalization. Its CPU per image is what grpc.aio itself costs to take the request's bytes in and
send an answer back on this machine; the gateway cannot go below it without another transport.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator

import grpc

from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.api.v1 import piaa_pb2_grpc as pb_grpc
from piaa_client.features import ATTRIBUTES, FEATURE_SPACE_VERSION, NUM_CONTENT_CLUSTERS
from piaa_personalization.api.server import READY_LINE

_TEMPLATE = pb.ImageScore(
    digest="0" * 64,
    score=0.5,
    generic_score=0.5,
    attributes=[pb.Attribute(name=n, value=0.5) for n in ATTRIBUTES],
    content=[1.0 / NUM_CONTENT_CLUSTERS] * NUM_CONTENT_CLUSTERS,
    personalized=True,
).SerializeToString()


def _canned(request: pb.ScoreRequest) -> pb.ScoreResponse:
    scores = []
    for image in request.images:
        score = pb.ImageScore.FromString(_TEMPLATE)
        score.id = image.id
        scores.append(score)
    return pb.ScoreResponse(scores=scores, feature_space_version=FEATURE_SPACE_VERSION)


class CannedScores(pb_grpc.PersonalizationServicer):
    """Score answers every image with the same canned ImageScore (its id copied from the request), and
    so does ScoreStream, request by request."""

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:  # noqa: N802
        return _canned(request)

    async def ScoreStream(  # noqa: N802
        self, requests: AsyncIterator[pb.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreStreamResponse]:
        async for request in requests:
            yield pb.ScoreStreamResponse(response=_canned(request))


async def serve(host: str, port: int) -> None:
    """Serves CannedScores on host:port (0: a free port) until cancelled; prints READY_LINE + address."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    pb_grpc.add_PersonalizationServicer_to_server(CannedScores(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"{READY_LINE}{host}:{bound}", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    """CLI: serves until SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m piaa_bench.grpc_floor", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
