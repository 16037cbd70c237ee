"""gRPC health probe for the gateway container: exit 0 when the gateway answers SERVING, else 1."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def default_address() -> str:
    """127.0.0.1 and the port the gateway's own config resolves from PIAA_* (so the probe cannot drift)."""
    from piaa_personalization.config import GatewayConfig

    return f"127.0.0.1:{GatewayConfig.load([], os.environ).port}"


def check(address: str, service: str = "", timeout_s: float = 2.0) -> str:
    """The health status name (SERVING, NOT_SERVING, ...) of `service` at `address`.

    Raises grpc.RpcError when the gateway does not answer within timeout_s.
    """
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: prints the status; exit status 0 only for SERVING (what docker HEALTHCHECK reads)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", default=None, help="host:port (default: 127.0.0.1 and PIAA_PORT)")
    parser.add_argument("--service", default="", help="health service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds")
    args = parser.parse_args(argv)
    address = args.address or default_address()
    try:
        status = check(address, args.service, args.timeout)
    except grpc.RpcError as err:
        print(f"{address}: {err.code().name}", file=sys.stderr)
        return 1
    print(f"{address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
