"""Test layers: tests/unit touch no network; tests/integration start real servers on loopback.

Fixtures for the real processes live in tests/fixtures/, one module per service.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_PHOTOS = REPO_ROOT.parent / "shared" / "data" / "photos"

pytest_plugins = [
    "tests.fixtures.photos",
    "tests.fixtures.redis",
    "tests.fixtures.triton",
    "tests.fixtures.gateway",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks each test by its folder, so `-m unit` and `-m integration` select layers."""
    for item in items:
        layer = Path(str(item.fspath)).relative_to(REPO_ROOT / "tests").parts[0]
        if layer in ("unit", "integration"):
            item.add_marker(getattr(pytest.mark, layer))


@pytest.fixture(autouse=True)
def _no_network_in_unit_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests may not open sockets: a test that needs one belongs in tests/integration."""
    if request.node.get_closest_marker("unit") is None:
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unit tests must not use the network; move this test to tests/integration")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "bind", refuse)
