"""Generates the gRPC stubs of the API protos next to them (piaa_client/api/v1/*_pb2*.py).

Used by the client's build (setup.py) and by `make setup`; a no-op when the stubs are newer than
their proto.
"""

from __future__ import annotations

import sys
from pathlib import Path

CLIENT_ROOT = Path(__file__).resolve().parent


def generate(force: bool = False) -> list[Path]:
    """Compiles every .proto under piaa_client/api; returns the protos that were (re)compiled."""
    from grpc_tools import protoc  # build-time dependency only

    include = Path(protoc.__file__).parent / "_proto"
    compiled = []
    for proto in sorted((CLIENT_ROOT / "piaa_client" / "api").rglob("*.proto")):
        stub = proto.with_name(proto.stem + "_pb2_grpc.py")
        if not force and stub.exists() and stub.stat().st_mtime >= proto.stat().st_mtime:
            continue
        relative = proto.relative_to(CLIENT_ROOT)
        args = [
            "grpc_tools.protoc",
            f"-I{CLIENT_ROOT}",
            f"-I{include}",
            f"--python_out={CLIENT_ROOT}",
            f"--pyi_out={CLIENT_ROOT}",
            f"--grpc_python_out={CLIENT_ROOT}",
            str(relative),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {relative}")
        compiled.append(proto)
    return compiled


if __name__ == "__main__":
    done = generate(force="--force" in sys.argv)
    print(f"stubs: generated for {len(done)} proto(s)" if done else "stubs: up to date")
