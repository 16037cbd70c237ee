"""The named-group feature space served for real: a `--content groups` release of the committed heads, side by
side on tritonserver (`--extra-heads`), gives the evaluation's group probabilities of the same photos, and
profiles rolled out into it (piaa-admin migrate --switch) are named by the groups in GetProfile."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from piaa_client import Client
from piaa_client import features as fs
from piaa_client.types import Rating
from piaa_export.release import export_release
from piaa_export.sources import HEADS_FILE
from piaa_export.taxonomy import GROUP_NAMES
from piaa_personalization.admin import cli as admin_cli
from piaa_personalization.evaluation.features import extract
from piaa_personalization.store.redis_server import RedisServer
from piaa_triton.paths import onnx_dir
from piaa_triton.repository import write_repository
from piaa_triton.server import ServerOptions, TritonServer
from tests.fixtures.gateway import start_gateway
from tests.fixtures.photos import SHARED_PHOTOS

SPACE = "fsgroups"
GROUPS_MODEL = f"piaa_{SPACE}"


@pytest.fixture(scope="module")
def groups_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """tritonserver serving fs1 (piaa) and the groups release of the committed heads (piaa_fsgroups), with
    the FP32 backbone the evaluation runs, so both see the same features."""
    work = tmp_path_factory.mktemp("named-groups")
    release = export_release(HEADS_FILE.parent, SPACE, work / "release", content="groups")
    repository = work / "cpu"
    write_repository(
        "cpu", repository, onnx_dir(), cores=1, extra_heads=[Path(release["onnx"])], precision="fp32"
    )
    with TritonServer(ServerOptions(repository=repository)) as server:
        yield server


def _infer(client: triton_grpc.InferenceServerClient, model: str, paths: list[Path]) -> dict[str, np.ndarray]:
    """The head outputs of `paths` from `model`, 16 images per request (the ensembles' max batch)."""
    parts = []
    for start in range(0, len(paths), 16):
        chunk = paths[start : start + 16]
        tensor = triton_grpc.InferInput(fs.ENSEMBLE_INPUT.name, [len(chunk), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[p.read_bytes()] for p in chunk], dtype=object))
        result = client.infer(model, [tensor])
        parts.append({o.name: result.as_numpy(o.name) for o in fs.HEAD_OUTPUTS})
    return {o.name: np.concatenate([part[o.name] for part in parts]) for o in fs.HEAD_OUTPUTS}


def test_the_served_groups_are_the_evaluations_group_probabilities(groups_triton: TritonServer) -> None:
    paths = sorted(SHARED_PHOTOS.glob("*.JPEG"))[::50]
    client = triton_grpc.InferenceServerClient(groups_triton.grpc_url)
    try:
        params = client.get_model_config(GROUPS_MODEL).config.parameters
        assert params["feature_space_version"].string_value == SPACE
        assert json.loads(params["content_names"].string_value) == list(GROUP_NAMES)
        assert "content_names" not in client.get_model_config("piaa").config.parameters
        groups, clusters = _infer(client, GROUPS_MODEL, paths), _infer(client, "piaa", paths)
    finally:
        client.close()
    content = groups["content"]
    np.testing.assert_allclose(content.sum(axis=1), 1.0, atol=1e-5)
    expected = extract(paths, onnx_dir()).groups  # the evaluation's own named-group content
    assert expected is not None
    assert float(np.max(np.abs(content - expected))) < 1e-4
    for name in ("generic", "attributes", "embedding"):  # the same trained heads in both spaces
        np.testing.assert_allclose(groups[name], clusters[name], atol=1e-6)
    assert float(np.max(np.abs(content - clusters["content"]))) > 0.1  # not the k-means clusters


def test_profiles_rolled_out_into_the_groups_space_are_named_by_the_groups(
    groups_triton: TritonServer, redis_server: RedisServer
) -> None:
    """The rollout of docs/operations.md: a user rates in fs1, `piaa-admin migrate --to fsgroups --switch`
    refits the profile from the stored backbone features with heads_fsgroups, the gateway follows, and
    GetProfile names the content features by the groups, the liked group among the likes."""
    prefix = f"grp{uuid.uuid4().hex[:8]}"
    paths = sorted(SHARED_PHOTOS.glob("*.JPEG"))[::8][:60]
    client = triton_grpc.InferenceServerClient(groups_triton.grpc_url)
    try:
        top = _infer(client, GROUPS_MODEL, paths)["content"].argmax(axis=1)
    finally:
        client.close()
    liked = int(np.bincount(top).argmax())
    ratings = [Rating(p, 5.0 if t == liked else 1.0) for p, t in zip(paths, top, strict=True)]
    gateway = start_gateway(redis_server.url, groups_triton.grpc_url, "--redis-key-prefix", prefix)
    user = f"groups-{uuid.uuid4().hex[:8]}"
    try:
        with Client(gateway.address, timeout=120.0) as piaa:
            piaa.add_ratings(user, ratings)
            before = piaa.get_profile(user)
            admin = [
                "--redis-url",
                redis_server.url,
                "--key-prefix",
                prefix,
                "--triton-url",
                groups_triton.grpc_url,
            ]
            assert admin_cli.main([*admin, "migrate", "--to", SPACE, "--switch", "--settle-s", "1.5"]) == 0
            deadline = time.monotonic() + 30
            profile = piaa.get_profile(user)
            while profile.feature_space_version != SPACE and time.monotonic() < deadline:
                time.sleep(0.2)  # the gateway follows the switch on its next health poll
                profile = piaa.get_profile(user)
            piaa.delete_profile(user)
    finally:
        gateway.stop()
        gateway.close()
    assert before.feature_space_version == fs.FEATURE_SPACE_VERSION
    assert [w.name for w in before.weights if w.name.startswith("content:")] == list(fs.CONTENT_NAMES)
    assert profile.feature_space_version == SPACE and profile.num_ratings == len(ratings)
    content = [w.name for w in profile.weights if w.name.startswith("content:")]
    assert content == [f"content:{name}" for name in GROUP_NAMES]
    assert f"content:{GROUP_NAMES[liked]}" in [f.name for f in profile.likes]
