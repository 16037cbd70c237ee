"""Feature spaces side by side, pure parts: profile keys per space, backbone-feature encoding, the
gateway's check of a served space, the release export's metadata (Redis and Triton: tests/integration/)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from piaa_client import features as fs
from piaa_personalization.core.spaces import UnservableSpace, check_config, ensemble_for
from piaa_personalization.store import backbone
from piaa_personalization.store import format as fmt

DIGEST = hashlib.sha256(b"photo").hexdigest()


def test_profiles_of_each_space_have_their_own_key_in_the_users_slot() -> None:
    base, new = fmt.Keys("piaa"), fmt.Keys("piaa", "fs2")
    assert base.profile("t", "a:b") == "piaa:{t:t:u:a%3Ab}:profile"  # the first space keeps its key
    assert new.profile("t", "a:b") == "piaa:{t:t:u:a%3Ab}:profile:fs2"
    assert base.profile("t", "u", "fs2") == new.profile("t", "u") and new.ratings("t", "u") == base.ratings(
        "t", "u"
    )
    assert new.owner_of(new.profile("t", "a:b")) == ("t", "a:b") == base.owner_of(base.profile("t", "a:b"))
    assert new.user_keys("t", "u", ["fs1", "fs2"]) == [
        new.profile("t", "u"),
        base.profile("t", "u"),
        base.ratings("t", "u"),
    ]
    # SCAN patterns of one space never match another space's profiles.
    assert base.all_profiles_pattern().endswith("}:profile") and new.all_profiles_pattern().endswith(
        "}:profile:fs2"
    )
    with pytest.raises(ValueError, match="feature-space"):
        fmt.Keys("piaa", "fs:2")


def test_backbone_features_round_trip_within_half_a_step() -> None:
    rng = np.random.default_rng(0)
    feature = (rng.gamma(0.6, 0.5, fs.BACKBONE_FEATURE_DIM)).astype(np.float32)
    raw = backbone.encode(feature)
    assert len(raw) == backbone.VALUE_BYTES == 1289
    back = backbone.decode(raw)
    step = (feature.max() - feature.min()) / 255
    assert back.dtype == np.float32 and np.max(np.abs(back - feature)) <= step / 2 + 1e-6
    assert np.array_equal(
        backbone.decode(backbone.encode(np.full(1280, 0.5))), np.full(1280, 0.5, np.float32)
    )
    assert backbone.key("piaa", DIGEST) == f"piaa:bb:{backbone.BACKBONE_ID}:{DIGEST}"


@pytest.mark.parametrize("bad", [np.zeros(1279), np.full(1280, np.nan)])
def test_backbone_features_refuse_bad_vectors(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="backbone feature"):
        backbone.encode(bad)


def test_backbone_decode_refuses_foreign_values() -> None:
    with pytest.raises(fmt.StoreDataError):
        backbone.decode(b"2" + backbone.encode(np.zeros(1280))[1:])
    with pytest.raises(fmt.StoreDataError):
        backbone.decode(b"1234")


def ensemble_config(space: str = "fs2", **override: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "parameters": {"feature_space_version": {"string_value": space}},
        "output": [{"name": o.name, "dims": [str(d) for d in o.dims]} for o in fs.HEAD_OUTPUTS],
        "ensemble_scheduling": {
            "step": [
                {"model_name": "preprocess", "input_map": {"image_bytes": "image_bytes"}},
                {"model_name": "backbone", "input_map": {"image": "preprocessed"}},
                {"model_name": f"heads_{space}", "input_map": {"feature": "feature"}},
            ]
        },
    }
    config.update(override)
    return config


def test_a_served_space_is_named_by_its_config() -> None:
    served = check_config("piaa_fs2", ensemble_config())
    assert (served.feature_space, served.ensemble, served.heads) == ("fs2", "piaa_fs2", "heads_fs2")
    assert ensemble_for("piaa", "fs2") == "piaa_fs2"


def test_the_heads_model_is_the_one_the_ensemble_names_when_no_step_runs_it() -> None:
    """The fused_heads layout: `piaa` is one step (the backbone's stub runs the heads), and the ensemble
    names the heads model that re-scores stored features."""
    one_step = {"step": [{"model_name": "backbone", "input_map": {"image_bytes": "image_bytes"}}]}
    params = {"feature_space_version": {"string_value": "fs1"}, "heads_model": {"string_value": "heads"}}
    served = check_config("piaa", ensemble_config(parameters=params, ensemble_scheduling=one_step))
    assert (served.feature_space, served.heads) == ("fs1", "heads")
    with pytest.raises(UnservableSpace, match="names no heads_model and has no heads step"):
        check_config("piaa", ensemble_config("fs1", ensemble_scheduling=one_step))


def test_a_space_the_gateway_cannot_serve_is_refused_with_the_reason() -> None:
    with pytest.raises(UnservableSpace, match="names no feature_space_version"):
        check_config("piaa", ensemble_config(parameters={}))
    wider = ensemble_config()
    wider["output"][2]["dims"] = ["12"]  # content with 12 clusters: another layout
    with pytest.raises(UnservableSpace, match=r"output 'content' \(12,\).*needs \(10,\)"):
        check_config("piaa", wider)
    with pytest.raises(UnservableSpace, match="no heads step"):
        check_config("piaa", ensemble_config(ensemble_scheduling={"step": []}))


def test_a_release_is_exported_with_its_feature_space(tmp_path: Path) -> None:
    from piaa_export.exceptions import ExportError
    from piaa_export.release import export_release
    from piaa_export.sources import HEADS_FILE
    from piaa_triton.repository import feature_space_of

    result = export_release(HEADS_FILE.parent, "fs9", tmp_path)
    assert feature_space_of(Path(result["onnx"])) == "fs9"
    assert max(result["max_abs_diff"].values()) < 1e-4
    with pytest.raises(ExportError, match="needs a new name"):
        export_release(HEADS_FILE.parent, fs.FEATURE_SPACE_VERSION, tmp_path)
