"""TritonServer start / ready / stop: nothing left behind, and a model that cannot load is reported."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from piaa_triton.exceptions import ServerStartError
from piaa_triton.paths import repository_dir
from piaa_triton.server import ServerOptions, TritonServer


def group_members(pgid: int) -> list[int]:
    """Live processes in a process group (the server and its Python stubs)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    members.append(int(entry.name))
            except ProcessLookupError:
                continue
    return members


def test_start_ready_stop_leaves_nothing_behind() -> None:
    server = TritonServer(ServerOptions(repository=repository_dir("cpu")))
    with server:
        assert server.is_ready()
        assert server.process is not None
        pgid = server.process.pid
        assert len(group_members(pgid)) >= 4, "expected tritonserver plus one stub per model instance"
        assert server.shm_regions(), "the Python stubs should have created their regions"
    assert server.process.poll() is not None
    assert group_members(pgid) == []
    assert server.shm_regions() == []
    assert not server.log_path.exists()


def test_a_model_that_cannot_load_is_reported_with_the_log(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(repository_dir("cpu"), repository, ignore=shutil.ignore_patterns("*.onnx"))
    (repository / "preprocess" / "1" / "model.py").write_text(
        "class TritonPythonModel:\n"
        "    def initialize(self, args):\n"
        "        raise RuntimeError('deliberately broken preprocess')\n"
    )
    for name in ("backbone", "heads"):  # keep the copy small: link the real ONNX files
        (repository / name / "1" / "model.onnx").symlink_to(repository_dir("cpu") / name / "1" / "model.onnx")
    server = TritonServer(ServerOptions(repository=repository, ready_timeout_s=120))
    with pytest.raises(ServerStartError, match="deliberately broken preprocess"):
        server.start()
    assert server.process is not None and server.process.poll() is not None
    assert group_members(server.process.pid) == []
    assert server.shm_regions() == []
    server.close()
