"""The named-group release: heads whose content is the classifier's coarse-group probabilities, computed in
the heads graph, checked against torch and against the evaluation's named-group content; the content names
carried from the heads file into the model repository and read by the gateway (Triton and the gateway for
real: tests/integration/test_named_groups_space.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from piaa_client import features as fs
from piaa_export import groups, taxonomy
from piaa_export.exceptions import ExportError, WeightsError
from piaa_export.heads import Heads, HeadWeights
from piaa_export.release import content_names_of, export_release
from piaa_export.runtime import session
from piaa_export.sources import HEADS_FILE
from piaa_personalization.core.spaces import UnservableSpace, check_config
from piaa_triton.repository import feature_space_of, write_repository
from tests.fixtures.photos import SHARED_PHOTOS


def test_every_class_is_in_exactly_one_group_of_the_matrix() -> None:
    matrix = groups.group_matrix()
    assert matrix.shape == (fs.IMAGENET_CLASSES, fs.NUM_CONTENT_CLUSTERS)
    assert set(np.unique(matrix)) == {0.0, 1.0} and (matrix.sum(axis=1) == 1).all()
    sizes = {name: int(n) for name, n in zip(taxonomy.GROUP_NAMES, matrix.sum(axis=0), strict=True)}
    assert sizes["dogs"] == 268 - 151 + 1 and sizes["scenery"] == 980 - 970 + 1


def test_group_heads_keep_the_other_outputs_and_compute_the_classifiers_groups() -> None:
    weights = HeadWeights.load()
    classifier = groups.load_classifier()
    features = np.random.default_rng(0).gamma(0.6, 0.5, (20, fs.BACKBONE_FEATURE_DIM)).astype(np.float32)
    with torch.no_grad():
        got = groups.GroupHeads(weights, classifier)(torch.from_numpy(features))
        plain = Heads(weights)(torch.from_numpy(features))
    for i in (0, 1, 3):  # generic, attributes, embedding: the trained heads unchanged
        np.testing.assert_array_equal(got[i].numpy(), plain[i].numpy())
    logits = features.astype(np.float64) @ classifier[0].T.astype(np.float64) + classifier[1]
    np.testing.assert_allclose(got[2].numpy(), groups.group_probabilities(logits), atol=1e-5)
    np.testing.assert_allclose(got[2].numpy().sum(axis=1), 1.0, atol=1e-5)
    assert not np.allclose(got[2].numpy(), plain[2].numpy(), atol=1e-2)  # not the k-means content


def test_a_groups_release_carries_its_space_and_names_and_matches_on_real_photos(tmp_path: Path) -> None:
    photos = sorted(SHARED_PHOTOS.glob("*.JPEG"))[::25]
    result = export_release(HEADS_FILE.parent, "fsgroups", tmp_path, content="groups", photos=photos)
    path = Path(result["onnx"])
    assert path.name == "heads_fsgroups.onnx" and feature_space_of(path) == "fsgroups"
    assert content_names_of(path) == taxonomy.GROUP_NAMES == tuple(result["content_names"])
    assert max(result["max_abs_diff"].values()) < 1e-4
    assert result["photo_parity"]["photos"] == len(photos)
    assert result["photo_parity"]["max_abs_diff"]["content"] < 1e-4
    (content,) = session(path).run(["content"], {"feature": np.zeros((1, 1280), np.float32)})
    assert content.shape == (1, 10) and abs(float(content.sum()) - 1.0) < 1e-5


def test_a_clusters_release_names_its_content_from_the_training_manifest(tmp_path: Path) -> None:
    result = export_release(HEADS_FILE.parent, "fsclusters", tmp_path)
    manifest = json.loads((HEADS_FILE.parent / "manifest.json").read_text())
    assert (
        content_names_of(Path(result["onnx"])) == tuple(manifest["content_names"]) == fs.CONTENT_CLUSTER_NAMES
    )
    assert result["content"] == "clusters" and "photo_parity" not in result


def test_bad_content_kinds_and_classifier_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="content is one of"):
        export_release(HEADS_FILE.parent, "fs9", tmp_path, content="topics")
    with pytest.raises(WeightsError, match="not found"):
        groups.load_classifier(tmp_path / "absent.pth")
    torch.save({"_fc.weight": torch.zeros(10, 1280)}, tmp_path / "small.pth")
    with pytest.raises(WeightsError, match=r"_fc.weight is \(10, 1280\)"):
        groups.load_classifier(tmp_path / "small.pth")


def _served_config(names: object = None) -> dict[str, Any]:
    params: dict[str, Any] = {"feature_space_version": {"string_value": "fsgroups"}}
    if names is not None:
        params["content_names"] = {"string_value": names if isinstance(names, str) else json.dumps(names)}
    return {
        "parameters": params,
        "output": [{"name": o.name, "dims": [str(d) for d in o.dims]} for o in fs.HEAD_OUTPUTS],
        "ensemble_scheduling": {
            "step": [{"model_name": "heads_fsgroups", "input_map": {"feature": "feature"}}]
        },
    }


def test_the_gateway_names_content_as_the_served_space_does() -> None:
    served = check_config("piaa_fsgroups", _served_config(list(taxonomy.GROUP_NAMES)))
    assert served.content_names == taxonomy.GROUP_NAMES
    pairs = [("intercept", 0.1), (fs.ATTRIBUTES[0], 0.2), (fs.CONTENT_NAMES[4], 0.3)]
    assert served.named(pairs) == [("intercept", 0.1), (fs.ATTRIBUTES[0], 0.2), ("content:dogs", 0.3)]
    plain = check_config("piaa", _served_config())  # no names: the layout's clusters
    assert plain.content_names == fs.CONTENT_CLUSTER_NAMES and plain.named(pairs) == pairs
    for bad in ("not json", ["only", "three", "names"], ["same"] * 10, [""] * 10):
        with pytest.raises(UnservableSpace, match="expected a JSON list of 10 distinct names"):
            check_config("piaa_fsgroups", _served_config(bad))


def test_the_model_repository_carries_each_spaces_content_names(tmp_path: Path) -> None:
    from tests.unit.test_triton_repository import fake_onnx, read_repository, stand_in_heads

    onnx_dir = fake_onnx(tmp_path)
    named = stand_in_heads(tmp_path / "heads_fsgroups.onnx", space="fsgroups")
    model = onnx.load(str(named))
    onnx.helper.set_model_props(
        model, {"feature_space_version": "fsgroups", "content_names": json.dumps(list(taxonomy.GROUP_NAMES))}
    )
    onnx.save(model, str(named))
    plain = stand_in_heads(tmp_path / "heads_fs3.onnx", space="fs3")
    write_repository("cpu", tmp_path / "cpu", onnx_dir, cores=2, extra_heads=[named, plain])
    models = read_repository(tmp_path / "cpu")
    names = {m: json.loads(c.parameters["content_names"].string_value) for m, c in models.items()
             if "content_names" in c.parameters}  # fmt: skip
    assert names == {
        "heads_fsgroups": list(taxonomy.GROUP_NAMES),
        "piaa_fsgroups": list(taxonomy.GROUP_NAMES),
    }


def test_the_album_report_names_content_as_the_profiles_space_does() -> None:
    from piaa_client.report import content_examples, content_names
    from piaa_client.types import ImageScore, Profile, TasteFactor

    weights = [TasteFactor(f"content:{name}", 0.0) for name in taxonomy.GROUP_NAMES]
    groups_profile = Profile("alice", True, 12, "fsgroups", 0.0, [], [], weights)
    assert content_names(groups_profile) == taxonomy.GROUP_NAMES
    assert content_names(Profile("alice", True, 12, "fsgroups", 0.0, [], [], [])) is None  # nothing to go by
    assert content_names(Profile("alice", True, 12, fs.FEATURE_SPACE_VERSION, 0.0, [], [], [])) == (
        fs.CONTENT_CLUSTER_NAMES
    )
    dog = ImageScore("p", "0" * 64, 0.5, 0.5, {}, tuple(np.eye(10)[4]), True, None)
    assert [name for name, _ in content_examples([dog], names=taxonomy.GROUP_NAMES)] == ["dogs"]


def test_the_groups_check_cli_reports_both_cpu_backbones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from piaa_triton.paths import onnx_dir

    release = export_release(HEADS_FILE.parent, "fsgroups", tmp_path, content="groups")
    assert (
        groups.main([str(SHARED_PHOTOS), release["onnx"], "--onnx-dir", str(onnx_dir()), "--limit", "4"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"fp32", "int8"} and report["fp32"]["photos"] == 4
    assert report["fp32"]["max_abs_diff"] < 1e-4 and report["fp32"]["top_group_agreement"] == 1.0
    assert 0 < report["int8"]["mean_abs_diff"] < 0.05  # quantized features: close, not equal


def test_the_release_cli_trains_and_exports_a_groups_release(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from piaa_export.release import main

    argv = [str(SHARED_PHOTOS), "--feature-space", "fsgroups", "--content", "groups", "--limit", "40"]
    assert main([*argv, "--degradations", "1", "--out", str(tmp_path)]) == 0
    assert "feature space fsgroups, content groups" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["feature_space_version"] == "fsgroups" and manifest["content"] == "groups"
    assert manifest["content_names"] == list(taxonomy.GROUP_NAMES)
    assert manifest["release"]["photo_parity"]["photos"] == 32
    assert content_names_of(tmp_path / "heads_fsgroups.onnx") == taxonomy.GROUP_NAMES
