"""The gateway's gRPC server: create_server(...), the error interceptor, health, reflection, workers."""

from __future__ import annotations

import asyncio
import collections
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.api.v1 import piaa_pb2_grpc as pb_grpc
from piaa_client.errors import STATUS_BY_NUMBER
from piaa_common.process import die_with_parent
from piaa_personalization.api.auth import PROTECTED_PREFIX, AuthInterceptor, KeyRing
from piaa_personalization.api.ratelimit import TenantRateLimiter
from piaa_personalization.api.servicer import PersonalizationServicer, public_message
from piaa_personalization.config import GatewayConfig
from piaa_personalization.core.metrics import Metrics
from piaa_personalization.core.service import PersonalizationService
from piaa_personalization.core.spaces import UnservableSpace
from piaa_personalization.errors import InvalidArgument, ServiceError

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Personalization"].full_name
"""Fully qualified service name, as health checks and reflection name it."""
READY_LINE = "gateway serving on "
"""The stdout line, followed by HOST:PORT, that `piaa serve` and this module print once every worker serves
(piaa_personalization.gateway_process waits for it)."""


def announce_ready(address: str) -> None:
    """Prints READY_LINE and the gateway's HOST:PORT on stdout, flushed."""
    print(f"{READY_LINE}{address}", flush=True)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns every exception of a unary handler into a status code, in this one place.

    ServiceError → its own code and message; anything else is logged with its traceback and becomes
    INTERNAL without details (never leak internals). Also counts RPCs by method and code. The request is
    parsed here rather than by gRPC, so a message that is not valid protobuf (e.g. a string field that
    is not UTF-8) is INVALID_ARGUMENT instead of gRPC's generic failure.
    """

    def __init__(self, metrics: Metrics, on_call: Callable[[int], None] | None = None) -> None:
        self.metrics = metrics
        self._on_call = on_call

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        path = str(handler_call_details.method)
        method = path.rsplit("/", 1)[-1]
        if handler.stream_stream is not None and path.startswith(PROTECTED_PREFIX):
            return self._guarded_stream(handler, method)
        if handler.unary_unary is None:
            return handler
        inner, parse = handler.unary_unary, handler.request_deserializer
        metrics, on_call = self.metrics, self._on_call

        async def guarded(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            if on_call is not None:
                on_call(+1)
            try:
                try:
                    request = parse(raw) if parse is not None else raw
                except Exception as err:  # DecodeError, or invalid UTF-8 in a string field
                    raise InvalidArgument(f"the request is not a valid {method} message") from err
                return await inner(request, context)
            except (Exception, asyncio.CancelledError) as err:
                code = _status_of(err, context)
                await _end_call(err, code, context, method)
            finally:
                if on_call is not None:
                    on_call(-1)
                metrics.requests.labels(method, code.name).inc()
                metrics.request_seconds.labels(method).observe(time.perf_counter() - start)

        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=None, response_serializer=handler.response_serializer
        )

    def _guarded_stream(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """A piaa.v1 request stream (ScoreStream): each message is parsed here, and one that is not valid
        protobuf reaches the servicer as its InvalidArgument, answered in its place. The stream's answers
        carry their own `error`, so every request is counted with its own code and latency (answers come
        in request order); an error that ends the whole stream is mapped and counted as for a unary call.
        """
        inner, parse = handler.stream_stream, handler.request_deserializer
        metrics, on_call = self.metrics, self._on_call
        rpc_seconds = metrics.request_seconds.labels(method)

        async def guarded(
            raw_requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            read_at: collections.deque[float] = collections.deque()

            async def parsed() -> AsyncIterator[Any]:
                async for raw in raw_requests:
                    read_at.append(time.perf_counter())
                    try:
                        yield parse(raw) if parse is not None else raw
                    except Exception:  # DecodeError, or invalid UTF-8 in a string field
                        yield InvalidArgument(f"the request is not a valid {method} message")

            code = grpc.StatusCode.OK
            if on_call is not None:
                on_call(+1)
            try:
                async for answer in inner(parsed(), context):
                    failed = answer.error.code if answer.HasField("error") else 0
                    metrics.requests.labels(method, STATUS_BY_NUMBER[failed].name).inc()
                    rpc_seconds.observe(time.perf_counter() - read_at.popleft())
                    yield answer
            except (Exception, asyncio.CancelledError) as err:
                code = _status_of(err, context)
                await _end_call(err, code, context, method)
            finally:
                if on_call is not None:
                    on_call(-1)
                if code != grpc.StatusCode.OK:
                    metrics.requests.labels(method, code.name).inc()

        return grpc.stream_stream_rpc_method_handler(
            guarded, request_deserializer=None, response_serializer=handler.response_serializer
        )


def _status_of(err: BaseException, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status a handler's exception ends its call with."""
    if isinstance(err, ServiceError):
        return grpc.StatusCode[err.status]
    if isinstance(err, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    if isinstance(err, grpc.aio.AbortError):  # the handler aborted with its own status
        return context.code() or grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.INTERNAL


async def _end_call(
    err: BaseException, code: grpc.StatusCode, context: grpc.aio.ServicerContext, method: str
) -> NoReturn:
    """Ends the call with `code`: a ServiceError is answered with its public_message() (its own message
    where that is the caller's to read; else a generic line, and the message is logged), anything
    unexpected is logged with its traceback and answered without details (never leak internals); a
    cancellation or the handler's own abort goes on as it is."""
    if isinstance(err, asyncio.CancelledError | grpc.aio.AbortError):
        raise err
    if isinstance(err, ServiceError):
        await context.abort(code, public_message(err, method))
    log.error("unexpected error in %s", method, exc_info=err)
    await context.abort(code, "internal error")
    raise AssertionError("context.abort returns only by raising")


class _InFlight:
    """Counts the calls being handled, so a drain knows when they are done."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, delta: int) -> None:
        self.count += delta


class GatewayServer:
    """A started-or-not gateway: the grpc.aio server plus health, so stop() can drain gracefully."""

    def __init__(
        self,
        server: grpc.aio.Server,
        service: PersonalizationService,
        health_servicer: Any,
        in_flight: _InFlight,
        servicer: PersonalizationServicer,
    ) -> None:
        self.grpc = server
        self.service = service
        self.servicer = servicer
        self.health = health_servicer
        self._in_flight = in_flight
        self._watcher: asyncio.Task[None] | None = None
        self._status: int | None = None

    @property
    def in_flight(self) -> int:
        """Calls being handled now."""
        return self._in_flight.count

    async def start(self, health_interval_s: float = 1.0) -> None:
        """Starts serving: "" reports SERVING (the process is alive); SERVICE_NAME reports SERVING while
        Triton's ensemble is ready, checked every `health_interval_s` (NOT_SERVING while it is not, so
        readiness probes take the gateway out of rotation until Triton is back)."""
        await self.grpc.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._follow_triton()
        self._watcher = asyncio.create_task(self._watch(health_interval_s))

    async def _follow_triton(self) -> None:
        ready = await self.service.triton.ready(timeout_s=2.0)
        status = (
            health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        if status != self._status:
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            log.log(
                logging.INFO if ready else logging.WARNING,
                "triton ready=%s: %s %s",
                ready,
                SERVICE_NAME,
                name,
            )
            self._status = status
            await self.health.set(SERVICE_NAME, status)

    async def _watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self._follow_triton()

    async def _set(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        """Graceful shutdown. First, before any await, the servicer drains: from then on every new call
        and ScoreStream is refused with UNAVAILABLE, and each open stream stops reading, answers what it
        read and ends with UNAVAILABLE. Then health says NOT_SERVING (so whoever sees it is refused), the
        server stops taking calls (gRPC's GOAWAY: clients reconnect, to another gateway behind a load
        balancer) while the calls in flight get up to `grace_s`, and the service closes (its batches
        finish)."""
        self.servicer.drain()
        log.info("stopping with %d calls and streams in flight", self.in_flight)
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.stop(grace_s)
        await self.service.close()

    async def wait_for_termination(self) -> None:
        """Returns when the server stopped."""
        await self.grpc.wait_for_termination()


def server_credentials(config: GatewayConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config's PEM files (client certificates required when
    tls_client_ca_file is set), or None when TLS is off; raises OSError when a file is unreadable."""
    if not config.tls_cert_file:
        return None

    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    ca = read(config.tls_client_ca_file) if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(read(config.tls_key_file), read(config.tls_cert_file))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def create_server(config: GatewayConfig, service: PersonalizationService) -> tuple[GatewayServer, int]:
    """A gateway server bound to config.host:config.port (0 picks a free port), not yet started.

    Returns the server and the bound port; raises RuntimeError when the port cannot be bound, and
    OSError or ValueError when the keys file or a TLS file is unreadable or malformed.
    """
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 1 if config.workers > 1 else 0),
    ]
    counter = _InFlight()
    keys = KeyRing.load(config.api_keys_file) if config.api_keys_file else None
    limiter = (
        TenantRateLimiter(config.rate_limit_per_s, config.rate_limit_burst)
        if config.rate_limit_per_s
        else None
    )
    auth = AuthInterceptor(
        keys, config.tenant_header, config.default_tenant, limiter.admit if limiter is not None else None
    )
    # Order matters: ErrorInterceptor first, so auth and rate-limit errors get their status codes too.
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor(service.metrics, counter.add), auth], options=options
    )
    servicer = PersonalizationServicer(service, config)
    pb_grpc.add_PersonalizationServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{config.host}:{config.port}"
    credentials = server_credentials(config)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise RuntimeError(f"cannot bind {config.host}:{config.port}")
    return GatewayServer(server, service, health_servicer, counter, servicer), port


async def run_worker(
    config: GatewayConfig, worker: int = 0, ready: Callable[[int], None] | None = None
) -> None:
    """Runs one gateway process until SIGINT/SIGTERM, then drains; calls ready(port) once serving."""
    service = await PersonalizationService.create(config)
    if config.metrics_port:
        service.metrics.serve_http(config.metrics_port + worker, config.host)
    gateway, port = create_server(config, service)
    await gateway.start(config.health_check_interval_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready(port)
    await stop.wait()
    log.info("worker %d draining", worker)
    await gateway.stop(config.drain_grace_s)


def _worker_main(config: GatewayConfig, worker: int, serving: Any, parent_pid: int) -> None:
    # A worker outlives a SIGKILLed parent otherwise, holding the port; SIGTERM lets it drain.
    die_with_parent(parent_pid, signal.SIGTERM)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s w{worker} %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(run_worker(config, worker, lambda _port: serving.set()))


def run(config: GatewayConfig, ready: Callable[[str], None] | None = None) -> None:
    """Runs the gateway with config.workers processes sharing the port; returns after SIGINT/SIGTERM.

    `ready` gets the gateway's address once every worker serves.
    """
    if config.workers == 1:
        asyncio.run(run_worker(config, 0, lambda port: ready(f"{config.host}:{port}") if ready else None))
        return
    ctx = multiprocessing.get_context("spawn")
    # Each worker reports that it serves through an event (a health probe would reach only one of them,
    # and could not speak TLS without the clients' roots).
    serving = [ctx.Event() for _ in range(config.workers)]
    procs = [
        ctx.Process(target=_worker_main, args=(config, i, serving[i], os.getpid()), daemon=False)
        for i in range(config.workers)
    ]
    stopping = False

    def terminate_all() -> None:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: each worker drains, then exits

    def on_signal(*_: Any) -> None:
        nonlocal stopping
        stopping = True
        terminate_all()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        for p in procs:
            p.start()
        if _wait_serving(serving, procs) and ready is not None:
            ready(f"{config.host}:{config.port}")
        # A worker that dies on its own takes the others down too: a half-served port is worse than none.
        while any(p.is_alive() for p in procs) and (stopping or all(p.is_alive() for p in procs)):
            time.sleep(0.2)
    finally:
        terminate_all()
        for p in procs:
            p.join()
    if not stopping:
        codes = [p.exitcode for p in procs]
        raise RuntimeError(f"a gateway worker exited on its own (exit codes {codes})")


def _wait_serving(serving: Sequence[Any], procs: Sequence[Any], timeout_s: float = 60.0) -> bool:
    """True once every worker serves; False as soon as one has died (never announce a half-served port:
    run()'s loop then reports the dead worker). Raises TimeoutError after `timeout_s`."""
    until = time.monotonic() + timeout_s
    while not all(e.is_set() for e in serving):
        if not all(p.is_alive() for p in procs):
            return False
        if time.monotonic() > until:
            raise TimeoutError(f"gateway workers not serving after {timeout_s} s")
        time.sleep(0.05)
    return True


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m piaa_personalization.api.server --redis-url ... --triton-url ...`: the gateway alone."""
    try:
        config = GatewayConfig.load(sys.argv[1:] if argv is None else argv)
    except ValueError as err:
        raise SystemExit(f"piaa gateway: {err}") from None
    if not config.redis_url or not config.triton_url:
        raise SystemExit("the gateway alone needs --redis-url and --triton-url (piaa serve starts both)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(config, ready=announce_ready)
    except UnservableSpace as err:  # one worker: the refusal itself; several: each worker logged it
        raise SystemExit(f"piaa gateway: {err}") from None


if __name__ == "__main__":
    main()
