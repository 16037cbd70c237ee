"""piaa_triton.server without starting anything: the command line, the environment, the refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from piaa_triton.exceptions import ServerStartError
from piaa_triton.server import ServerOptions, TritonServer


def test_command_binds_loopback_with_static_models_and_our_shm_prefix(tmp_path: Path) -> None:
    server = TritonServer(ServerOptions(repository=tmp_path))
    server.http_port, server.grpc_port, server.metrics_port = 8000, 8001, 8002
    args = server.command()
    server.close()
    assert "--model-control-mode=none" in args
    for flag in ("--http-address", "--grpc-address", "--metrics-address"):
        assert f"{flag}=127.0.0.1" in args
    assert f"--model-repository={tmp_path}" in args
    assert f"--backend-config=python,shm-region-prefix-name={server.shm_prefix}" in args
    assert (server.grpc_url, server.http_url) == ("127.0.0.1:8001", "http://127.0.0.1:8000")
    assert server.metrics_url == "http://127.0.0.1:8002/metrics"


def test_each_server_has_its_own_shm_prefix(tmp_path: Path) -> None:
    one, two = (
        TritonServer(ServerOptions(repository=tmp_path)),
        TritonServer(ServerOptions(repository=tmp_path)),
    )
    assert one.shm_prefix != two.shm_prefix
    one.close()
    two.close()


def test_environment_puts_this_venv_first_on_path(tmp_path: Path) -> None:
    server = TritonServer(ServerOptions(repository=tmp_path))
    path = server.environment()["PATH"].split(":")
    server.close()
    assert path[0] == str(Path(sys.executable).parent)


def test_missing_repository_is_refused_before_anything_starts(tmp_path: Path) -> None:
    server = TritonServer(ServerOptions(repository=tmp_path / "nowhere"))
    with pytest.raises(ServerStartError, match="no model repository"):
        server.start()
    assert server.process is None
    server.close()
    assert not server.log_path.exists()
