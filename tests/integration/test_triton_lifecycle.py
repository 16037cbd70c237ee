"""TritonServer lifecycle: nothing left behind, load failures reported with the log, overload shed."""

from __future__ import annotations

import os
import queue
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from piaa_triton.exceptions import ServerStartError
from piaa_triton.paths import repository_dir
from piaa_triton.repository import CPU_BATCHING, write_repository
from piaa_triton.server import ServerOptions, TritonServer
from tests.fixtures.photos import Photo


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
    (repository / "backbone" / "1" / "model.py").write_text(  # the backbone: in either cpu layout
        "class TritonPythonModel:\n"
        "    def initialize(self, args):\n"
        "        raise RuntimeError('deliberately broken backbone')\n"
    )
    for name in ("backbone", "heads"):  # keep the copy small: link the real ONNX files
        (repository / name / "1" / "model.onnx").symlink_to(repository_dir("cpu") / name / "1" / "model.onnx")
    server = TritonServer(ServerOptions(repository=repository, ready_timeout_s=120))
    with pytest.raises(ServerStartError, match="deliberately broken backbone"):
        server.start()
    assert server.process is not None and server.process.poll() is not None
    assert group_members(server.process.pid) == []
    assert server.shm_regions() == []
    server.close()


def test_overload_is_shed_not_buffered(tmp_path: Path, photos: list[Photo]) -> None:
    """With a queue of 2, a burst of 16 concurrent requests gets some rejected at once (UNAVAILABLE)."""
    tight = replace(CPU_BATCHING, max_batch_size=1, max_queue_size=2)
    write_repository("cpu", tmp_path / "repository", policy=tight)  # from build/onnx, as make setup does
    data = photos[0].path.read_bytes()
    with TritonServer(ServerOptions(repository=tmp_path / "repository")) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        tensor = grpcclient.InferInput("image_bytes", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[data]], dtype=object))
        done: queue.Queue[object] = queue.Queue()
        for _ in range(16):
            client.async_infer("piaa", [tensor], lambda result, error: done.put(error))
        errors = [done.get(timeout=120) for _ in range(16)]
        client.close()
    shed = [e for e in errors if e is not None]
    assert shed, "a queue of 2 took 16 concurrent requests without shedding any"
    assert len(shed) < 16, "nothing was served"
    for error in shed:
        assert isinstance(error, InferenceServerException)
        assert error.status() == "StatusCode.UNAVAILABLE"
        assert "queue size" in error.message()


def test_not_ready_in_time_is_reported_and_cleaned_up() -> None:
    """A server still loading at the deadline is stopped mid-load: no process, no region left."""
    server = TritonServer(ServerOptions(repository=repository_dir("cpu"), ready_timeout_s=0.5))
    with pytest.raises(ServerStartError, match=r"not ready after 0 s.*\n"):
        server.start()
    assert server.process is not None and server.process.poll() is not None
    assert group_members(server.process.pid) == []
    assert server.shm_regions() == []
    server.close()
