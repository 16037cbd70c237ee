"""auth.py: the keys file, key extraction from metadata, key → tenant, and the key-making CLI."""

from __future__ import annotations

import pytest

from piaa_personalization.api import auth
from piaa_personalization.api.auth import KeyRing, authenticate, hash_key, key_from_metadata, new_key
from piaa_personalization.errors import PermissionDenied, Unauthenticated

HEADER = "x-piaa-tenant"


def ring(**tenants: str) -> KeyRing:
    return KeyRing.parse("\n".join(f"{hash_key(key)} {tenant}" for tenant, key in tenants.items()))


def test_a_key_maps_to_its_tenant_and_only_hashes_are_stored() -> None:
    a, b = new_key(), new_key()
    text = f"# tenants\n\n{hash_key(a)} acme   # the first\n{hash_key(b)} globex\n"
    keys = KeyRing.parse(text)
    assert len(keys) == 2
    assert keys.tenant_of(a) == "acme" and keys.tenant_of(b) == "globex"
    assert keys.tenant_of(a + "x") is None and keys.tenant_of("") is None
    assert a not in text and b not in text
    assert hash_key(a) == "sha256:" + __import__("hashlib").sha256(a.encode()).hexdigest()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no keys"),
        ("# only a comment\n", "no keys"),
        ("acme sha256:" + "0" * 64, "expected"),  # the old order
        ("sha256:" + "0" * 63 + " acme", "64 hex"),
        ("sha256:" + "g" * 64 + " acme", "64 hex"),
        ("sha256:" + "0" * 64 + " bad:tenant", "keys file:1"),
        ("sha256:" + "0" * 64 + " acme extra", "expected"),
        (f"sha256:{'0' * 64} acme\nsha256:{'0' * 64} globex", "twice"),
    ],
)
def test_malformed_keys_files_are_refused_naming_the_line(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KeyRing.parse(text)


def test_a_deploy_template_placeholder_is_refused() -> None:
    with pytest.raises(ValueError, match="64 hex"):
        KeyRing.parse("sha256:REPLACE_WITH_SHA256_OF_THE_KEY default\n")


@pytest.mark.parametrize(
    ("metadata", "key"),
    [
        ((("authorization", "Bearer k1"),), "k1"),
        ((("authorization", "bearer   k1 "),), "k1"),
        ((("x-api-key", "k2"),), "k2"),
        ((("authorization", "Basic abc"),), None),
        ((("authorization", "Bearer "),), None),
        ((("x-piaa-tenant", "acme"),), None),
        ((), None),
        (None, None),
    ],
)
def test_key_from_metadata(metadata: tuple[tuple[str, str], ...] | None, key: str | None) -> None:
    assert key_from_metadata(metadata) == key


def test_authenticate_gives_the_keys_tenant_or_the_right_error() -> None:
    a = new_key()
    keys = ring(acme=a)
    assert authenticate(keys, (("authorization", f"Bearer {a}"),), HEADER) == "acme"
    # Naming one's own tenant is fine; naming another is PERMISSION_DENIED, not a silent switch.
    assert authenticate(keys, (("authorization", f"Bearer {a}"), (HEADER, "acme")), HEADER) == "acme"
    with pytest.raises(PermissionDenied):
        authenticate(keys, (("authorization", f"Bearer {a}"), (HEADER, "globex")), HEADER)
    with pytest.raises(Unauthenticated, match="missing"):
        authenticate(keys, ((HEADER, "acme"),), HEADER)
    with pytest.raises(Unauthenticated, match="unknown"):
        authenticate(keys, (("authorization", "Bearer " + new_key()),), HEADER)
    assert Unauthenticated.status == "UNAUTHENTICATED" and PermissionDenied.status == "PERMISSION_DENIED"


def test_cli_new_prints_a_key_and_a_line_that_parses(capsys: pytest.CaptureFixture[str]) -> None:
    assert auth.main(["new", "--tenant", "acme"]) == 0
    key_line, entry = capsys.readouterr().out.splitlines()
    key = key_line.removeprefix("key: ")
    assert KeyRing.parse(entry).tenant_of(key) == "acme"
    assert auth.main(["new", "--tenant", "no spaces"]) == 2


def test_cli_hash_reads_keys_from_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("k1\n\nk2\n"))
    assert auth.main(["hash"]) == 0
    assert capsys.readouterr().out.split() == [hash_key("k1"), hash_key("k2")]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tls_cert_file": "c.pem"}, "go together"),
        ({"tls_key_file": "k.pem"}, "go together"),
        ({"tls_client_ca_file": "ca.pem"}, "mutual TLS"),
        ({"rate_limit_per_s": -1.0}, "rate_limit"),
        ({"rate_limit_burst": 0}, "rate_limit"),
        ({"health_check_interval_s": 0.0}, "positive"),
    ],
)
def test_security_settings_are_validated(changes: dict[str, object], message: str) -> None:
    from piaa_personalization.config import GatewayConfig

    with pytest.raises(ValueError, match=message):
        GatewayConfig(**changes)  # type: ignore[arg-type]
    full = GatewayConfig.load(
        [], environ={"PIAA_API_KEYS_FILE": "/etc/k", "PIAA_TLS_CERT_FILE": "c", "PIAA_TLS_KEY_FILE": "k"}
    )
    assert full.api_keys_file == "/etc/k" and full.tls_cert_file == "c"
