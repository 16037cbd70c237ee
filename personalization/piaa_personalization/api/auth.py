"""API keys → tenants: the keys file (hashed keys), one gRPC interceptor, and a CLI to make keys.

The keys file has one key per line, `sha256:<64 hex> <tenant>`; blank lines and `#` comments are skipped.
Only the SHA-256 of each key is stored: keys are 32 random bytes (`python -m piaa_personalization.api.auth
new --tenant acme`), so a fast hash is enough (a slow one such as scrypt only matters for guessable
passwords) and the check costs one hash per call. A call carries its key as `authorization: Bearer
<key>` (what piaa_client sends) or `x-api-key: <key>`; the key decides the tenant, and a tenant header
naming another tenant is refused with PERMISSION_DENIED. Health and reflection stay open (load
balancers and tooling probe them without keys; they reveal no user data).
"""

from __future__ import annotations

import argparse
import contextvars
import hashlib
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from piaa_personalization.errors import PermissionDenied, RateLimited, ServiceError, Unauthenticated
from piaa_personalization.store.format import validate_tenant

PROTECTED_PREFIX = "/piaa.v1.Personalization/"
"""Methods under this prefix need a key; everything else (health, reflection) does not."""

_current_tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar("piaa_tenant", default=None)


def current_tenant() -> str | None:
    """The tenant the interceptor authenticated for the call being handled (None when auth is off)."""
    return _current_tenant.get()


def hash_key(key: str) -> str:
    """The keys file's form of `key`: 'sha256:<hex>'."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random API key (43 URL-safe characters, 256 bits)."""
    return secrets.token_urlsafe(32)


class KeyRing:
    """Hashed keys → tenant. Built from the keys file's text; raises ValueError naming the bad line."""

    def __init__(self, entries: dict[str, str]) -> None:
        self._tenants = dict(entries)

    @classmethod
    def parse(cls, text: str, source: str = "keys file") -> KeyRing:
        """Parses `sha256:<hex> <tenant>` lines; raises ValueError for a malformed line or a duplicate."""
        entries: dict[str, str] = {}
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[0].startswith("sha256:"):
                raise ValueError(f"{source}:{n}: expected 'sha256:<hex> <tenant>'")
            digest, tenant = parts[0].removeprefix("sha256:").lower(), parts[1]
            try:
                validate_tenant(tenant)
            except ValueError as err:
                raise ValueError(f"{source}:{n}: {err}") from err
            if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
                raise ValueError(f"{source}:{n}: the hash is not 64 hex digits")
            if digest in entries:
                raise ValueError(f"{source}:{n}: the same key is listed twice")
            entries[digest] = tenant
        if not entries:
            raise ValueError(f"{source}: no keys (an empty keys file would lock everyone out)")
        return cls(entries)

    @classmethod
    def load(cls, path: str | Path) -> KeyRing:
        """The keys file at `path`; raises OSError when unreadable and ValueError when malformed."""
        return cls.parse(Path(path).read_text(encoding="utf-8"), str(path))

    def __len__(self) -> int:
        return len(self._tenants)

    def tenant_of(self, key: str) -> str | None:
        """The tenant of `key`, or None for an unknown key (a dict lookup on the hash: no timing oracle
        on the key itself)."""
        return self._tenants.get(hashlib.sha256(key.encode("utf-8")).hexdigest())


def key_from_metadata(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The API key a call carries (`authorization: Bearer <key>` or `x-api-key`), or None."""
    for name, value in metadata or ():
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        if name == "authorization":
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == "x-api-key" and text.strip():
            return text.strip()
    return None


def authenticate(keys: KeyRing, metadata: Sequence[tuple[str, Any]] | None, tenant_header: str) -> str:
    """The caller's tenant; raises Unauthenticated (no or unknown key) or PermissionDenied (the tenant
    header names a tenant other than the key's)."""
    key = key_from_metadata(metadata)
    if key is None:
        raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'")
    tenant = keys.tenant_of(key)
    if tenant is None:
        raise Unauthenticated("unknown API key")
    for name, value in metadata or ():
        if name == tenant_header and value and str(value) != tenant:
            raise PermissionDenied("this API key does not give access to the tenant named in the call")
    return tenant


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the API key of every piaa.v1 call and then the tenant's rate limit; the tenant is handed
    to the servicer through current_tenant(). Errors are raised as ServiceError for ErrorInterceptor
    (which must come first in the server's interceptor list) to map."""

    def __init__(
        self,
        keys: KeyRing | None,
        tenant_header: str,
        default_tenant: str,
        admit: Callable[[str], None] | None = None,
    ) -> None:
        self.keys = keys
        self.tenant_header = tenant_header
        self.default_tenant = default_tenant
        self.admit = admit

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not str(handler_call_details.method).startswith(PROTECTED_PREFIX):
            return handler
        if handler.stream_stream is not None:
            return self._checked_stream(handler)
        if handler.unary_unary is None:
            return handler
        inner, admit = handler.unary_unary, self.admit

        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            tenant = self._tenant(context.invocation_metadata())
            if admit is not None:
                admit(tenant)
            token = _current_tenant.set(tenant if self.keys is not None else None)
            try:
                return await inner(request, context)
            finally:
                _current_tenant.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            checked,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _tenant(self, metadata: Sequence[tuple[str, Any]] | None) -> str:
        if self.keys is not None:
            return authenticate(self.keys, metadata, self.tenant_header)
        # no keys file: the tenant header decides (development only; see docs/reliability.md)
        return next((str(v) for k, v in metadata or () if k == self.tenant_header and v), self.default_tenant)

    def _checked_stream(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """A request stream's key is checked once, when it opens; the rate limit admits each request (a
        refused one reaches the servicer as its RateLimited, answered in its place)."""
        inner, admit = handler.stream_stream, self.admit

        async def checked(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            tenant = self._tenant(context.invocation_metadata())

            async def admitted() -> AsyncIterator[Any]:
                async for request in requests:
                    if admit is None or isinstance(request, ServiceError):
                        yield request
                        continue
                    try:
                        admit(tenant)
                    except RateLimited as err:
                        yield err
                    else:
                        yield request

            token = _current_tenant.set(tenant if self.keys is not None else None)
            try:
                async for response in inner(admitted(), context):
                    yield response
            finally:
                _current_tenant.reset(token)

        return grpc.stream_stream_rpc_method_handler(
            checked,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `new --tenant T` prints a fresh key and its keys-file line; `hash` hashes keys read from stdin."""
    parser = argparse.ArgumentParser(prog="python -m piaa_personalization.api.auth", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new", help="make a key for a tenant: prints the key, then its keys-file line")
    new.add_argument("--tenant", required=True)
    sub.add_parser("hash", help="read keys (one per line) from stdin, print their hashes")
    args = parser.parse_args(argv)
    if args.command == "new":
        try:
            validate_tenant(args.tenant)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        key = new_key()
        print(f"key: {key}")
        print(f"{hash_key(key)} {args.tenant}")
        return 0
    for line in sys.stdin:
        if line.strip():
            print(hash_key(line.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
