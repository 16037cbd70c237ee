"""Security through the real gateway: API keys → tenants, tenant isolation, TLS and mutual TLS, the
per-tenant rate limit, Redis as a least-privilege ACL user, Triton's admin APIs closed.

One module gateway serves TLS, checks keys, limits rates and talks to a password-protected Redis as the
ACL user of store.acl_rules(); a second one requires client certificates (mutual TLS).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
import tritonclient.grpc as triton_grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.api.v1 import piaa_pb2_grpc as pb_grpc
from piaa_personalization.api.auth import hash_key, new_key
from piaa_personalization.store.redis_server import RedisServer
from piaa_personalization.store.redis_store import acl_rules
from piaa_triton.server import ADMIN_HEADER, TritonServer
from tests.fixtures.gateway import GatewayProcess, start_gateway
from tests.fixtures.photos import Photo

TENANTS = ("acme", "globex", "bursty")
RATE, BURST = 2, 40
STARS = pb.RATING_SCALE_STARS_1_5


# --- test PKI (made at test time, never committed) -------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], cn: str, server: bool
) -> tuple[bytes, bytes]:
    """(key PEM, cert PEM) signed by `ca`; a server certificate names 127.0.0.1 and localhost."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca[1].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(ca[0], hashes.SHA256())
    return _pem_key(key), cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Pki:
    ca: bytes
    server_key: Path
    server_cert: Path
    ca_file: Path
    client_key: bytes
    client_cert: bytes
    rogue_key: bytes
    rogue_cert: bytes


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue_ca = make_ca("piaa test CA"), make_ca("someone else's CA")
    server_key, server_cert = issue(ca, "gateway", server=True)
    client_key, client_cert = issue(ca, "client", server=False)
    rogue_key, rogue_cert = issue(rogue_ca, "client", server=False)
    ca_pem = ca[1].public_bytes(serialization.Encoding.PEM)
    paths = {"server.key": server_key, "server.crt": server_cert, "ca.crt": ca_pem}
    for name, data in paths.items():
        (folder / name).write_bytes(data)
    return Pki(
        ca_pem, folder / "server.key", folder / "server.crt", folder / "ca.crt",
        client_key, client_cert, rogue_key, rogue_cert,
    )  # fmt: skip


# --- Redis with a password and the store's ACL user -------------------------------------------------------
@dataclass
class AclRedis:
    server: RedisServer
    url: str
    """The gateway's URL: the least-privilege user."""

    def admin(self) -> redis.Redis:
        return redis.Redis(host=self.server.host, port=self.server.port, password=self.server.password)


@pytest.fixture(scope="module")
def acl_redis() -> Iterator[AclRedis]:
    with RedisServer(password=new_key()) as server:
        user_password = new_key()
        with redis.Redis(host=server.host, port=server.port, password=server.password) as admin:
            admin.execute_command("ACL", "SETUSER", "piaa", "on", f">{user_password}", *acl_rules())
        yield AclRedis(server, f"redis://piaa:{user_password}@{server.host}:{server.port}/0")


# --- the gateways -------------------------------------------------------------------------------------------
@dataclass
class Secured:
    gateway: GatewayProcess
    keys: dict[str, str]
    pki: Pki

    def channel(self, client_cert: bool = False) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(
            self.pki.ca,
            self.pki.client_key if client_cert else None,
            self.pki.client_cert if client_cert else None,
        )
        return grpc.secure_channel(self.gateway.address, credentials)

    def auth(self, tenant: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.keys[tenant]}"),)


def _keys_file(folder: Path) -> tuple[Path, dict[str, str]]:
    keys = {tenant: new_key() for tenant in TENANTS}
    path = folder / "keys"
    path.write_text("".join(f"{hash_key(k)} {t}\n" for t, k in keys.items()))
    return path, keys


@pytest.fixture(scope="module")
def secured(
    triton_server: TritonServer, acl_redis: AclRedis, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Secured]:
    keys_file, keys = _keys_file(tmp_path_factory.mktemp("keys"))
    gateway = start_gateway(
        acl_redis.url, triton_server.grpc_url,
        "--api-keys-file", str(keys_file),
        "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key),
        "--rate-limit-per-s", str(RATE), "--rate-limit-burst", str(BURST),
    )  # fmt: skip
    try:
        yield Secured(gateway, keys, pki)
    finally:
        assert gateway.stop() == 0, gateway.output()[-3000:]


def _code(call: object, *args: object, **kwargs: object) -> grpc.StatusCode:
    try:
        call(*args, **kwargs)  # type: ignore[operator]
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


# --- authentication ---------------------------------------------------------------------------------------
def test_calls_need_a_known_key_but_health_and_reflection_do_not(secured: Secured) -> None:
    with secured.channel() as channel:
        stub = pb_grpc.PersonalizationStub(channel)
        request = pb.GetProfileRequest(user_id="u")
        assert _code(stub.GetProfile, request, timeout=30) == grpc.StatusCode.UNAUTHENTICATED
        bad = (("authorization", "Bearer " + new_key()),)
        assert _code(stub.GetProfile, request, metadata=bad, timeout=30) == grpc.StatusCode.UNAUTHENTICATED
        tenant_only = (("x-piaa-tenant", "acme"),)  # naming a tenant is not a credential
        assert (
            _code(stub.GetProfile, request, metadata=tenant_only, timeout=30)
            == grpc.StatusCode.UNAUTHENTICATED
        )
        assert not stub.GetProfile(request, metadata=secured.auth("acme"), timeout=30).exists
        by_header = (("x-api-key", secured.keys["acme"]),)
        assert not stub.GetProfile(request, metadata=by_header, timeout=30).exists
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_a_plaintext_or_untrusting_client_cannot_talk_to_the_tls_gateway(secured: Secured) -> None:
    with grpc.insecure_channel(secured.gateway.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert _code(stub.Check, health_pb2.HealthCheckRequest(), timeout=5) == grpc.StatusCode.UNAVAILABLE
    rogue_roots = make_ca("not the gateway's CA")[1].public_bytes(serialization.Encoding.PEM)
    with grpc.secure_channel(secured.gateway.address, grpc.ssl_channel_credentials(rogue_roots)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert _code(stub.Check, health_pb2.HealthCheckRequest(), timeout=5) == grpc.StatusCode.UNAVAILABLE


# --- tenant isolation -------------------------------------------------------------------------------------
def test_one_tenant_can_never_read_rate_or_delete_anothers_users(
    secured: Secured, photos: list[Photo]
) -> None:
    images = [pb.Image(data=p.path.read_bytes()) for p in photos[700:703]]
    acme, globex = secured.auth("acme"), secured.auth("globex")
    with secured.channel() as channel:
        stub = pb_grpc.PersonalizationStub(channel)
        ratings = [
            pb.Rating(image=img, value=v, scale=STARS) for img, v in zip(images, (5, 1, 4), strict=True)
        ]
        stub.AddRatings(pb.AddRatingsRequest(user_id="alice", ratings=ratings), metadata=acme, timeout=120)
        assert (
            stub.GetProfile(pb.GetProfileRequest(user_id="alice"), metadata=acme, timeout=30).num_ratings == 3
        )

        # Read: globex's "alice" is another person, with no profile.
        assert not stub.GetProfile(pb.GetProfileRequest(user_id="alice"), metadata=globex, timeout=30).exists
        (score,) = stub.Score(
            pb.ScoreRequest(user_id="alice", images=images[:1]), metadata=globex, timeout=60
        ).scores
        assert not score.personalized and score.fallback_reason == pb.FALLBACK_REASON_NO_PROFILE
        # Claiming acme's tenant with globex's key is refused, not honoured.
        claim = (*globex, ("x-piaa-tenant", "acme"))
        for call, request in (
            (stub.GetProfile, pb.GetProfileRequest(user_id="alice")),
            (stub.DeleteProfile, pb.DeleteProfileRequest(user_id="alice")),
            (stub.AddRatings, pb.AddRatingsRequest(user_id="alice", ratings=ratings[:1])),
        ):
            assert _code(call, request, metadata=claim, timeout=30) == grpc.StatusCode.PERMISSION_DENIED
        # Rate and delete: only globex's own "alice" changes.
        stub.AddRatings(
            pb.AddRatingsRequest(user_id="alice", ratings=ratings[:1]), metadata=globex, timeout=60
        )
        assert stub.DeleteProfile(
            pb.DeleteProfileRequest(user_id="alice"), metadata=globex, timeout=30
        ).deleted
        mine = stub.GetProfile(pb.GetProfileRequest(user_id="alice"), metadata=acme, timeout=30)
        assert mine.exists and mine.num_ratings == 3
        (mine_scored,) = stub.Score(
            pb.ScoreRequest(user_id="alice", images=images[:1]), metadata=acme, timeout=60
        ).scores
        assert mine_scored.personalized
        assert stub.DeleteProfile(pb.DeleteProfileRequest(user_id="alice"), metadata=acme, timeout=30).deleted


# --- the per-tenant rate limit ----------------------------------------------------------------------------
async def test_a_tenant_over_its_rate_is_refused_while_others_are_served(secured: Secured) -> None:
    credentials = grpc.ssl_channel_credentials(secured.pki.ca)
    async with grpc.aio.secure_channel(secured.gateway.address, credentials) as channel:
        stub = pb_grpc.PersonalizationStub(channel)
        request = pb.GetProfileRequest(user_id="u")

        async def one(tenant: str) -> grpc.StatusCode:
            try:
                await stub.GetProfile(request, metadata=secured.auth(tenant), timeout=60)
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK

        codes = await asyncio.gather(*(one("bursty") for _ in range(BURST + 30)))
        ok = codes.count(grpc.StatusCode.OK)
        limited = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert ok + limited == len(codes), set(codes)
        assert BURST <= ok <= BURST + 15 and limited >= 15, (ok, limited)  # refills at RATE/s meanwhile
        assert await one("acme") == grpc.StatusCode.OK  # another tenant's bucket is untouched
        try:
            await stub.GetProfile(request, metadata=secured.auth("bursty"), timeout=60)
        except grpc.aio.AioRpcError as err:
            assert "rate limit" in (err.details() or "")


# --- mutual TLS ---------------------------------------------------------------------------------------------
def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(
    triton_server: TritonServer, redis_server: RedisServer, pki: Pki, tmp_path: Path
) -> None:
    keys_file, keys = _keys_file(tmp_path)
    gateway = start_gateway(
        redis_server.url, triton_server.grpc_url, "--api-keys-file", str(keys_file),
        "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key),
        "--tls-client-ca-file", str(pki.ca_file),
    )  # fmt: skip
    try:
        auth = (("authorization", f"Bearer {keys['acme']}"),)
        request = pb.GetProfileRequest(user_id="u")
        for client_key, client_cert, expected in (
            (pki.client_key, pki.client_cert, grpc.StatusCode.OK),
            (None, None, grpc.StatusCode.UNAVAILABLE),  # no client certificate: the handshake fails
            (pki.rogue_key, pki.rogue_cert, grpc.StatusCode.UNAVAILABLE),  # signed by another CA
        ):
            credentials = grpc.ssl_channel_credentials(pki.ca, client_key, client_cert)
            with grpc.secure_channel(gateway.address, credentials) as channel:
                stub = pb_grpc.PersonalizationStub(channel)
                assert _code(stub.GetProfile, request, metadata=auth, timeout=10) == expected
    finally:
        assert gateway.stop() == 0, gateway.output()[-3000:]


# --- Redis: password and least privilege ------------------------------------------------------------------
def test_the_gateway_runs_every_call_as_the_least_privilege_redis_user(
    secured: Secured, acl_redis: AclRedis, photos: list[Photo]
) -> None:
    """Every RPC through the ACL user, then: Redis logged no denial, and the user cannot leave its keys,
    flush, reconfigure or read other channels; nobody without the password gets in at all."""
    images = [pb.Image(data=p.path.read_bytes()) for p in photos[705:709]]
    meta = secured.auth("acme")
    with acl_redis.admin() as admin:
        admin.execute_command("ACL", "LOG", "RESET")
    with secured.channel() as channel:
        stub = pb_grpc.PersonalizationStub(channel)
        ratings = [pb.Rating(image=img, value=float(i % 5 + 1), scale=STARS) for i, img in enumerate(images)]
        stub.AddRatings(pb.AddRatingsRequest(user_id="acl", ratings=ratings), metadata=meta, timeout=120)
        assert (
            stub.Score(pb.ScoreRequest(user_id="acl", images=images[:2]), metadata=meta, timeout=60)
            .scores[0]
            .personalized
        )
        stub.RankAlbum(pb.RankAlbumRequest(user_id="acl", images=images), metadata=meta, timeout=60)
        stub.ScoreForUsers(
            pb.ScoreForUsersRequest(image=images[0], user_ids=["acl", "x"]), metadata=meta, timeout=60
        )
        stub.SuggestImagesToRate(
            pb.SuggestImagesToRateRequest(user_id="acl", candidates=images, k=2), metadata=meta, timeout=60
        )
        assert stub.GetProfile(pb.GetProfileRequest(user_id="acl"), metadata=meta, timeout=30).exists
        assert stub.DeleteProfile(pb.DeleteProfileRequest(user_id="acl"), metadata=meta, timeout=30).deleted
    with acl_redis.admin() as admin:
        denials = admin.execute_command("ACL", "LOG")
        assert denials == [], denials  # the rule set covers every command the store sends
        assert admin.execute_command("ACL", "GETUSER", "piaa")
    user = redis.Redis.from_url(acl_redis.url)
    try:
        assert user.ping()
        refused = (
            ("SET", "elsewhere", "x"), ("GET", "elsewhere"), ("FLUSHALL",), ("CONFIG", "GET", "*"),
            ("KEYS", "*"), ("ACL", "LIST"), ("PUBLISH", "other", "x"), ("DEBUG", "SLEEP", "0"),
        )  # fmt: skip
        for command in refused:
            with pytest.raises(redis.exceptions.NoPermissionError):
                user.execute_command(*command)
    finally:
        user.close()
    anonymous = redis.Redis(host=acl_redis.server.host, port=acl_redis.server.port)
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()
    finally:
        anonymous.close()


# --- Triton -------------------------------------------------------------------------------------------------
def test_triton_listens_on_loopback_and_refuses_its_admin_apis(triton_server: TritonServer) -> None:
    assert triton_server.grpc_url.startswith("127.0.0.1:")
    assert "--grpc-address=127.0.0.1" in triton_server.command()
    client = triton_grpc.InferenceServerClient(triton_server.grpc_url)
    try:
        assert client.is_server_ready() and client.get_model_config("piaa")  # what the gateway needs
        for admin_call in (
            client.get_system_shared_memory_status,
            client.get_cuda_shared_memory_status,
            client.get_model_repository_index,
            lambda: client.register_system_shared_memory("x", "/piaa_x", 64),
            lambda: client.load_model("piaa"),
            lambda: client.unload_model("piaa"),
        ):
            with pytest.raises(InferenceServerException):
                admin_call()
        # With the per-start key (held only by whoever started the server) the same API answers; over
        # gRPC Triton expects it under the header triton-grpc-protocol-<name>.
        key = {f"triton-grpc-protocol-{ADMIN_HEADER}": triton_server.admin_key}
        assert client.get_model_repository_index(headers=key) is not None
        assert client.is_model_ready("piaa")
    finally:
        client.close()


def test_the_python_client_speaks_tls_and_bearer_keys(secured: Secured) -> None:
    """piaa_client's own options (tls, roots, token) are all a caller needs; its errors name the cause."""
    from piaa_client import client as piaa
    from piaa_client import errors

    with piaa.Client(
        secured.gateway.address, tls=True, root_certificates=secured.pki.ca, token=secured.keys["acme"]
    ) as c:
        assert not c.get_profile("client-user").exists
    with (
        piaa.Client(secured.gateway.address, tls=True, root_certificates=secured.pki.ca, token="nope") as c,
        pytest.raises(errors.Unauthenticated),
    ):
        c.get_profile("client-user")
    other = secured.keys["globex"]
    with (
        piaa.Client(
            secured.gateway.address, tls=True, root_certificates=secured.pki.ca, token=other, tenant="acme"
        ) as c,
        pytest.raises(errors.PermissionDenied),
    ):
        c.get_profile("client-user")


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "No such file"), ("", "no keys"), ("sha256:REPLACE_WITH_SHA256_OF_THE_KEY default\n", "64 hex")],
)
def test_the_gateway_refuses_to_start_without_a_usable_keys_file(
    triton_server: TritonServer, redis_server: RedisServer, tmp_path: Path, content: str | None, message: str
) -> None:
    """Fail closed: a missing, empty or placeholder keys file stops the gateway instead of serving open."""
    keys_file = tmp_path / "keys"
    if content is not None:
        keys_file.write_text(content)
    with pytest.raises(RuntimeError, match=message):
        start_gateway(
            redis_server.url, triton_server.grpc_url, "--api-keys-file", str(keys_file), timeout_s=60
        )
