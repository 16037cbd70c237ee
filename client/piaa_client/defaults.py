"""What the client and the gateway agree on (port, message limit, tenant header), and client defaults."""

from __future__ import annotations

DEFAULT_PORT = 50151
"""The gateway's gRPC port."""

DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_PORT}"
"""Where the client and the CLI look for the gateway unless told otherwise."""

DEFAULT_TIMEOUT_S = 30.0
"""The client's deadline per call, in seconds, retries included."""

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""The largest gRPC message either side sends or accepts (a request carries whole photos)."""

TENANT_HEADER = "x-piaa-tenant"
"""Call metadata naming the caller's tenant where the deployment has no API keys."""
