"""The cpu profile's layouts in the real tritonserver: the fused backbone (decode and ONNX Runtime in one
stub) answers every ensemble as the split preprocess → backbone does, side by side on the same ONNX files,
and fused_heads (the heads in the backbone's stub too) answers `piaa` bit for bit as fused does."""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from piaa_client import features as fs
from piaa_triton.paths import onnx_dir
from piaa_triton.repository import BACKBONE_ENSEMBLE, ENSEMBLE, write_repository
from piaa_triton.server import ServerOptions, TritonServer
from tests.fixtures.photos import Photo

TOLERANCE = 1e-4
"""The same ONNX file on one ORT thread (fused) and two (split): sums may round differently, no more."""
HEADS = [o.name for o in fs.HEAD_OUTPUTS]
RELEASE = "fs2"
"""A second feature space served side by side (heads_fs2, piaa_fs2), as a rollout does."""


@pytest.fixture(scope="module")
def clients(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, grpcclient.InferenceServerClient]]:
    """A tritonserver per layout, each with a second heads model side by side; their gRPC clients."""
    root = tmp_path_factory.mktemp("layouts")
    release = onnx.load(str(onnx_dir() / "heads.onnx"))
    onnx.helper.set_model_props(release, {"feature_space_version": RELEASE})
    onnx.save(release, str(root / f"heads_{RELEASE}.onnx"))
    with contextlib.ExitStack() as stack:
        out = {}
        for layout in ("split", "fused", "fused_heads"):
            write_repository("cpu", root / layout, cores=2, extra_heads=[root / f"heads_{RELEASE}.onnx"],
                             precision="int8", layout=layout)  # fmt: skip
            server = stack.enter_context(TritonServer(ServerOptions(repository=root / layout)))
            out[layout] = stack.enter_context(
                contextlib.closing(grpcclient.InferenceServerClient(server.grpc_url))
            )
        yield out


def request(images: Sequence[bytes]) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput(fs.ENSEMBLE_INPUT.name, [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[data] for data in images], dtype=object))
    return [tensor]


def infer(
    client: grpcclient.InferenceServerClient, model: str, images: Sequence[bytes]
) -> dict[str, np.ndarray]:
    names = [fs.BACKBONE_FEATURE.name] if model == BACKBONE_ENSEMBLE else HEADS
    outputs = [grpcclient.InferRequestedOutput(n) for n in names]
    result = client.infer(model, request(images), outputs=outputs)
    return {name: result.as_numpy(name) for name in names}


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for name, expected in want.items():
        assert got[name].shape == expected.shape, name
        diff = float(np.max(np.abs(got[name] - expected)))
        assert diff <= TOLERANCE, f"{name}: max abs diff {diff:.2e} > {TOLERANCE}"


def backbone_stats(client: grpcclient.InferenceServerClient, model: str = "backbone") -> tuple[int, int]:
    """(requests, executions) the backbone model (or `model`) has run so far."""
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def test_the_fused_backbone_takes_the_bytes_and_the_ensembles_keep_their_contract(
    clients: dict[str, grpcclient.InferenceServerClient],
) -> None:
    split = clients["split"]
    for fused in (clients["fused"], clients["fused_heads"]):
        backbone = fused.get_model_config("backbone").config
        assert [t.name for t in backbone.input] == [fs.ENSEMBLE_INPUT.name]
        assert not fused.is_model_ready("preprocess") and split.is_model_ready("preprocess")
        for model in (ENSEMBLE, f"{ENSEMBLE}_{RELEASE}", BACKBONE_ENSEMBLE):
            want, got = (
                split.get_model_metadata(model, as_json=True),
                fused.get_model_metadata(model, as_json=True),
            )
            assert (got["inputs"], got["outputs"]) == (want["inputs"], want["outputs"]), model


@pytest.mark.parametrize("layout", ["fused", "fused_heads"])
@pytest.mark.parametrize("model", [ENSEMBLE, f"{ENSEMBLE}_{RELEASE}", BACKBONE_ENSEMBLE])
def test_fused_answers_as_split_on_shared_photos(
    clients: dict[str, grpcclient.InferenceServerClient], photos: list[Photo], model: str, layout: str
) -> None:
    sample = [p.path.read_bytes() for p in photos[5::60]]  # 14 photos across the classes
    for chunk in (sample[:1], sample[1:8], sample[8:]):  # single and multi-image requests
        assert_close(infer(clients[layout], model, chunk), infer(clients["split"], model, chunk))


def test_a_corrupt_jpeg_between_good_ones_fails_only_its_request(
    clients: dict[str, grpcclient.InferenceServerClient], photos: list[Photo]
) -> None:
    split, fused = clients["split"], clients["fused"]
    images = [p.path.read_bytes() for p in photos[11:300:36]]  # 8 photos
    corrupt_at = 4
    images[corrupt_at] = images[corrupt_at][: len(images[corrupt_at]) // 3]  # truncated JPEG
    before = backbone_stats(fused)
    done: queue.Queue[tuple[int, object, object]] = queue.Queue()
    for i, data in enumerate(images):  # all in flight at once, so the batcher groups them
        fused.async_infer(ENSEMBLE, request([data]), lambda result, error, i=i: done.put((i, result, error)))
    results = {i: (r, e) for i, r, e in (done.get(timeout=60) for _ in images)}
    requests, executions = (a - b for a, b in zip(backbone_stats(fused), before, strict=True))
    for i, data in enumerate(images):
        result, error = results[i]
        if i == corrupt_at:
            assert isinstance(error, InferenceServerException)
            assert error.status() == "StatusCode.INVALID_ARGUMENT"
            with pytest.raises(InferenceServerException) as split_error:
                split.infer(ENSEMBLE, request([data]))
            assert "cannot decode JPEG image" in error.message()
            assert error.message() == split_error.value.message(), "the split path's message, word for word"
            continue
        assert error is None, f"request {i} failed: {error}"
        assert isinstance(result, grpcclient.InferResult)
        assert_close({n: result.as_numpy(n) for n in HEADS}, infer(split, ENSEMBLE, [data]))
    assert requests == len(images) and executions < requests, "the requests were never batched together"


def test_a_multi_image_request_with_one_bad_image_is_refused_whole_naming_it(
    clients: dict[str, grpcclient.InferenceServerClient], photos: list[Photo]
) -> None:
    good = photos[40].path.read_bytes()
    messages = {}
    for layout, client in clients.items():
        with pytest.raises(InferenceServerException) as caught:
            client.infer(ENSEMBLE, request([good, b"GIF89a" + b"\x00" * 64, good]))
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        messages[layout] = caught.value.message()
    assert messages["fused"] == messages["fused_heads"] == messages["split"]
    assert "image 1: unsupported image format (GIF)" in messages["fused"]
    # The server goes on serving the next request.
    assert_close(infer(clients["fused"], ENSEMBLE, [good]), infer(clients["split"], ENSEMBLE, [good]))


def test_each_layouts_repository_holds_only_its_models(tmp_path: Path) -> None:
    write_repository("cpu", tmp_path / "cpu", cores=2, layout="fused")
    assert sorted(p.name for p in (tmp_path / "cpu").iterdir()) == sorted(
        ["backbone", "heads", ENSEMBLE, BACKBONE_ENSEMBLE]
    )
    write_repository("cpu", tmp_path / "cpu", cores=2, layout="fused_heads")
    assert sorted(p.name for p in (tmp_path / "cpu" / "backbone" / "1").iterdir()) == [
        "heads.onnx", "model.onnx", "model.py"
    ]  # fmt: skip


def heads_on(
    client: grpcclient.InferenceServerClient, model: str, feature: np.ndarray
) -> dict[str, np.ndarray]:
    """The heads model `model` run by itself on `feature` (the fused layout's former second step)."""
    tensor = grpcclient.InferInput(fs.BACKBONE_FEATURE.name, list(feature.shape), "FP32")
    tensor.set_data_from_numpy(feature)
    result = client.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput(n) for n in HEADS])
    return {name: result.as_numpy(name) for name in HEADS}


def test_fused_heads_piaa_is_one_step_and_bit_identical_to_fused(
    clients: dict[str, grpcclient.InferenceServerClient], photos: list[Photo]
) -> None:
    """One request at a time, so that every model's batch is that request's images in both layouts."""
    fused, one_step = clients["fused"], clients["fused_heads"]
    steps = one_step.get_model_config(ENSEMBLE).config.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["backbone"]
    sample = [p.path.read_bytes() for p in photos[7::70]]  # 12 photos across the classes
    for chunk in (sample[:1], sample[1:6], sample[6:]):
        before = backbone_stats(one_step, "heads")
        got = infer(one_step, ENSEMBLE, chunk)
        assert backbone_stats(one_step, "heads") == before, "piaa ran the heads model, not the backbone's"
        feature = infer(one_step, BACKBONE_ENSEMBLE, chunk)[fs.BACKBONE_FEATURE.name]
        # fused's piaa; its graph (backbone, then the heads model) run by hand in fused_heads' server; and
        # the side-by-side ensemble, which is that graph with the same weights under another space's name.
        wants = (infer(fused, ENSEMBLE, chunk), heads_on(one_step, "heads", feature),
                 infer(one_step, f"{ENSEMBLE}_{RELEASE}", chunk))  # fmt: skip
        for want in wants:
            assert want.keys() == got.keys()
            for name in HEADS:
                np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def failing_heads(path: Path) -> None:
    """A heads file with the heads' input and output names whose every run fails (a reshape that 1280
    values cannot fill), so that any request that runs it fails."""
    feature = onnx.helper.make_tensor_value_info(fs.BACKBONE_FEATURE.name, onnx.TensorProto.FLOAT, ["n", "d"])
    shape = onnx.helper.make_tensor("shape", onnx.TensorProto.INT64, [3], [-1, 7, 3])
    nodes = [onnx.helper.make_node("Reshape", [fs.BACKBONE_FEATURE.name, "shape"], ["bad"])]
    nodes += [onnx.helper.make_node("Identity", ["bad"], [name]) for name in HEADS]
    outputs = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in HEADS]
    graph = onnx.helper.make_graph(nodes, "failing_heads", [feature], outputs, [shape])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_a_feature_request_runs_no_heads_in_the_fused_heads_backbone(
    tmp_path: Path, photos: list[Photo]
) -> None:
    """The fused backbone's heads replaced by ones that always fail: piaa fails, piaa_backbone does not."""
    write_repository("cpu", tmp_path / "cpu", cores=2, precision="int8", layout="fused_heads")
    failing_heads(tmp_path / "cpu" / "backbone" / "1" / "heads.onnx")
    images = [p.path.read_bytes() for p in photos[3:6]]
    with (
        TritonServer(ServerOptions(repository=tmp_path / "cpu")) as server,
        contextlib.closing(grpcclient.InferenceServerClient(server.grpc_url)) as client,
    ):
        feature = infer(client, BACKBONE_ENSEMBLE, images)[fs.BACKBONE_FEATURE.name]
        assert feature.shape == (3, *fs.BACKBONE_FEATURE.dims)
        with pytest.raises(InferenceServerException, match="onnxruntime failed on a batch of 3"):
            infer(client, ENSEMBLE, images)
        assert heads_on(client, "heads", feature).keys() == set(HEADS), "the heads model is untouched"
