from __future__ import annotations

import json

import pytest

from data.errors import BundleError, ParameterError
from data.workspace import Workspace
from models import bundle


def test_current_model_loads_with_its_features_and_threshold(trained_workspace):
    ws = Workspace.at(trained_workspace)
    version = bundle.current_version(ws.models_dir)
    loaded = bundle.load_bundle(ws.version_dir(version))
    assert loaded.version == version
    assert loaded.feature_names == [f"f{j}" for j in range(6)]
    assert loaded.threshold > 0 and loaded.percentile == 98.0
    meta = loaded.metadata
    assert meta["training"]["rows_holdout_normal"] == meta["threshold"]["rows"]
    assert set(meta["library_versions"]) >= {"tensorflow", "keras", "numpy", "pyarrow"}
    assert not list(ws.models_dir.glob("*.partial"))


def test_altered_model_file_is_refused(workspace_copy):
    ws = Workspace.at(workspace_copy)
    version_dir = ws.version_dir(bundle.current_version(ws.models_dir))
    with open(version_dir / "model.keras", "ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(BundleError, match="checksum .* does not match bundle.json"):
        bundle.load_bundle(version_dir)


def test_edited_or_truncated_bundle_json_is_refused(workspace_copy):
    ws = Workspace.at(workspace_copy)
    version_dir = ws.version_dir(bundle.current_version(ws.models_dir))
    path = version_dir / "bundle.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(BundleError, match="bundle.json: not valid JSON"):
        bundle.load_bundle(version_dir)
    meta = json.loads(text)
    meta["threshold"]["value"] *= 2
    path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="do not match the checksum written at training"):
        bundle.load_bundle(version_dir)
    # Even an edit that keeps the checksum consistent cannot make the model take other features.
    meta = json.loads(text)
    meta["features"] = meta["features"][:-1]
    meta["bundle_sha256"] = bundle.bundle_digest(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="takes 6 features but bundle.json lists 5"):
        bundle.load_bundle(version_dir)


def test_missing_current_pointer_says_to_retrain(tmp_path):
    with pytest.raises(BundleError, match="no current model; run the retraining flow first"):
        bundle.current_version(tmp_path)


def test_promote_refuses_unknown_or_escaping_versions(workspace_copy):
    models = Workspace.at(workspace_copy).models_dir
    with pytest.raises(BundleError, match="missing"):
        bundle.promote(models, "20990101T000000Z")
    with pytest.raises(ParameterError, match="model_version='../x' is not a plain name"):
        bundle.promote(models, "../x")


def copy_version(models, source: str, target: str) -> None:
    """Copy a version folder under a new name, rewriting bundle.json consistently."""
    import shutil

    shutil.copytree(models / source, models / target)
    meta = json.loads((models / target / "bundle.json").read_text())
    meta["model_version"] = target
    meta["bundle_sha256"] = bundle.bundle_digest(meta)
    (models / target / "bundle.json").write_text(json.dumps(meta))


def test_a_bundle_moved_to_another_version_folder_is_refused(workspace_copy):
    import shutil

    models = Workspace.at(workspace_copy).models_dir
    shutil.copytree(models / bundle.current_version(models), models / "20270101T000000Z")
    with pytest.raises(BundleError, match="lies in folder '20270101T000000Z'"):
        bundle.promote(models, "20270101T000000Z")


def test_promote_records_the_previous_version(workspace_copy):
    models = Workspace.at(workspace_copy).models_dir
    first = bundle.current_version(models)
    copy_version(models, first, "20270101T000000Z")
    bundle.promote(models, "20270101T000000Z")
    pointer = json.loads((models / "current.json").read_text())
    assert pointer["model_version"] == "20270101T000000Z" and pointer["previous_version"] == first


def test_list_versions_marks_current_and_unusable_versions(workspace_copy):
    models = Workspace.at(workspace_copy).models_dir
    first = bundle.current_version(models)
    copy_version(models, first, "20270101T000000Z")
    (models / "20280101T000000Z").mkdir()
    (models / "20290101T000000Z.partial").mkdir()
    listed = {v["model_version"]: v for v in bundle.list_versions(models)}
    assert set(listed) == {first, "20270101T000000Z", "20280101T000000Z"}
    assert listed[first]["current"] and not listed["20270101T000000Z"]["current"]
    assert not listed["20280101T000000Z"]["usable"] and "missing" in listed["20280101T000000Z"]["problem"]


def test_stale_staging_folders_are_removed(workspace_copy):
    models = Workspace.at(workspace_copy).models_dir
    (models / "20290101T000000Z.partial" / "_work").mkdir(parents=True)
    assert [p.name for p in bundle.remove_stale_staging(models)] == ["20290101T000000Z.partial"]
    assert not (models / "20290101T000000Z.partial").exists()
