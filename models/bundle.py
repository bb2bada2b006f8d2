"""The model bundle: a version folder with model.keras and bundle.json, saved, checked, loaded and promoted."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data import storage
from data.errors import BundleError
from data.workspace import check_path_part
from models.threshold import order_statistic

if TYPE_CHECKING:
    from models.autoencoder import ErrorScorer
    from models.runtime import keras

# Keras (and TensorFlow) are imported where a model is loaded or built, not with this module: jobs
# that only read bundle.json, such as the evaluation of labels, then start without them.

BUNDLE_FORMAT = 1
MODEL_FILE = "model.keras"
BUNDLE_FILE = "bundle.json"
CURRENT_FILE = "current.json"
PROMOTION_FILE = "promotion.json"
STAGING_SUFFIX = ".partial"


def new_version(now: dt.datetime | None = None) -> str:
    """Return a sortable version name from the UTC time, e.g. ``20261128T113700Z``."""
    now = now or dt.datetime.now(dt.UTC)
    return now.strftime("%Y%m%dT%H%M%SZ")


def staging_dir(models_dir: Path, version: str) -> Path:
    """Return (and create, empty) the local folder a version is built in before it is published.

    The folder is beside the version on a disk, in the spool for object storage.
    """
    return storage.fresh_dir(
        storage.local_work_dir(models_dir) / f"{check_path_part(version, 'model_version')}{STAGING_SUFFIX}"
    )


def library_versions() -> dict[str, str]:
    """Return the versions of the libraries a bundle depends on."""
    import numpy
    import pandas
    import pyarrow
    import sklearn
    import tensorflow

    from models.runtime import keras

    return {
        "python": platform.python_version(),
        "tensorflow": tensorflow.__version__,
        "keras": keras.__version__,
        "numpy": numpy.__version__,
        "pandas": pandas.__version__,
        "pyarrow": pyarrow.__version__,
        "scikit-learn": sklearn.__version__,
    }


def publish_bundle(staging: Path, models_dir: Path | None = None) -> Path:
    """Publish a complete staging folder as its version folder in ``models_dir`` (default: the staging folder's own).

    On a disk this is a rename, so a crash before it leaves only ``*.partial``; in object storage
    bundle.json is uploaded last, and a version folder without it is not a version.
    """
    if not staging.name.endswith(STAGING_SUFFIX):
        raise BundleError(f"{staging}: not a staging folder")
    read_bundle_json(staging)
    target_dir = storage.as_path(models_dir) if models_dir is not None else staging.parent
    return storage.publish_dir(staging, target_dir / staging.name.removesuffix(STAGING_SUFFIX), last=BUNDLE_FILE)


def read_bundle_json(version_dir: Path) -> dict[str, Any]:
    """Read and check bundle.json of a version folder, refusing one that is missing, edited or inconsistent."""
    path = version_dir / BUNDLE_FILE
    try:
        bundle = storage.read_json(path)
    except FileNotFoundError as exc:
        raise BundleError(
            f"{path}: missing; is {version_dir.name!r} a model version? Retrain or pick another version"
        ) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc}); the bundle is damaged, retrain or roll back") from exc
    required = ("format_version", "model_version", "features", "threshold", "model_sha256", "config", "bundle_sha256")
    missing = [key for key in required if key not in bundle]
    if missing:
        raise BundleError(f"{path}: missing keys {missing}; the bundle is damaged, retrain or roll back")
    if bundle["format_version"] != BUNDLE_FORMAT:
        raise BundleError(f"{path}: format_version {bundle['format_version']} is not {BUNDLE_FORMAT}")
    if bundle["bundle_sha256"] != bundle_digest(bundle):
        raise BundleError(
            f"{path}: contents do not match the checksum written at training (edited by hand?); retrain or roll back"
        )
    if bundle["model_version"] != version_dir.name.removesuffix(STAGING_SUFFIX):
        raise BundleError(f"{path}: names version {bundle['model_version']!r} but lies in folder {version_dir.name!r}")
    return bundle


def bundle_digest(bundle: dict[str, Any]) -> str:
    """Return the SHA-256 of a bundle's canonical JSON, leaving out the digest itself."""
    body = {k: v for k, v in bundle.items() if k != "bundle_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def remove_stale_staging(models_dir: Path) -> list[Path]:
    """Delete ``*.partial`` folders of retraining runs that died.

    In object storage, version folders whose upload did not finish go too. Call only while holding
    the retraining lock.
    """
    stale = [p for p in storage.list_dirs(storage.local_work_dir(models_dir)) if p.name.endswith(STAGING_SUFFIX)]
    if storage.is_remote(models_dir):
        stale += [p for p in storage.list_dirs(models_dir) if not storage.is_file(p / BUNDLE_FILE)]
    for path in stale:
        storage.remove_tree(path)
    return stale


def list_versions(models_dir: Path) -> list[dict[str, Any]]:
    """Return every published version, oldest first, with its threshold and promotion decision."""
    current = current_version(models_dir, required=False)
    versions = []
    for path in (p for p in storage.list_dirs(models_dir) if not p.name.endswith(STAGING_SUFFIX)):
        try:
            meta = read_bundle_json(path)
        except BundleError as exc:
            versions.append({"model_version": path.name, "usable": False, "problem": str(exc)})
            continue
        gate = storage.read_json_if_present(path / PROMOTION_FILE)
        versions.append({
            "model_version": path.name,
            "usable": True,
            "current": path.name == current,
            "created_at": meta.get("created_at"),
            "preset": meta.get("preset"),
            "threshold": meta["threshold"]["value"],
            "percentile": meta["threshold"]["percentile"],
            "promotion_gate": gate,
        })
    return versions


@dataclass(frozen=True)
class LoadedBundle:
    """A checked model and the facts scoring needs from bundle.json."""

    path: Path
    model: keras.Model
    metadata: dict[str, Any]

    @functools.cached_property
    def scorer(self) -> ErrorScorer:
        """The compiled error function of this model, built once per loaded bundle."""
        from models.autoencoder import ErrorScorer

        return ErrorScorer(self.model, self.loss)

    @property
    def version(self) -> str:
        return str(self.metadata["model_version"])

    @property
    def feature_names(self) -> list[str]:
        return [f["name"] for f in self.metadata["features"]]

    @property
    def vocabularies(self) -> dict[str, list[str]]:
        """Each categorical feature's training values, in the order of their codes."""
        return {f["name"]: list(f["vocabulary"]) for f in self.metadata["features"] if f.get("kind") == "categorical"}

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"]["value"])

    @property
    def percentile(self) -> float:
        return float(self.metadata["threshold"]["percentile"])

    @property
    def exceedance_beta(self) -> tuple[float, float]:
        """Parameters (a, b) of the Beta law of the rate at which normal rows exceed the threshold."""
        return exceedance_beta(self.metadata)

    @property
    def drift_reference(self) -> dict[str, Any] | None:
        """What nightly drift is measured against (None for bundles written before it was kept)."""
        return self.metadata.get("drift_reference")

    @property
    def loss(self) -> str:
        return str(self.metadata["config"]["loss"])

    @property
    def label_column(self) -> str:
        return str(self.metadata.get("label_column", "label"))

    @property
    def normal_label(self) -> str:
        return str(self.metadata.get("normal_label", "0"))

    @property
    def fills_missing(self) -> bool:
        """Whether the model fills in missing feature values (bundles written before it could quarantine them)."""
        return self.metadata.get("missing_values") == "fill"


def exceedance_beta(metadata: dict[str, Any]) -> tuple[float, float]:
    """Return (a, b) of the Beta law of the normal flag rate, from bundle.json.

    For older bundles, which lack it, it is derived from the held-out rows.
    """
    threshold = metadata["threshold"]
    if "uncertainty" in threshold:
        law = threshold["uncertainty"]["exceedance_rate_beta"]
        return float(law["a"]), float(law["b"])
    rows = int(threshold["rows"])
    k = order_statistic(rows, float(threshold["percentile"]))
    return float(rows - k + 1), float(k)


def load_bundle(version_dir: str | os.PathLike[str]) -> LoadedBundle:
    """Load a version folder after checking its checksum and feature list; the model loads in Keras' safe mode."""
    version_dir = storage.absolute(version_dir)
    metadata = read_bundle_json(version_dir)
    model_path = version_dir / str(metadata.get("model_file", MODEL_FILE))
    if not storage.is_file(model_path):
        raise BundleError(f"{model_path}: model file missing; retrain or roll back")
    remote = storage.is_remote(model_path)
    local_path = _local_copy(model_path) if remote else model_path
    actual = storage.content_hash(local_path)
    if actual != metadata["model_sha256"]:
        if remote:
            storage.remove(local_path)
        raise BundleError(
            f"{model_path}: checksum {actual[:12]}… does not match bundle.json ({metadata['model_sha256'][:12]}…); "
            "refusing to load an altered model"
        )
    return _load_checked(str(local_path), actual, json.dumps(metadata, sort_keys=True))


def _local_copy(model_path: Path) -> Path:
    """Return a local copy of a model in object storage, downloaded once per version of the object (its ETag).

    Keras loads from a local file. The copy is named after the object's state, so processes on one
    machine share it and a replaced object is downloaded again; the caller checks it against bundle.json.
    """
    state = storage.file_state(model_path)
    name = hashlib.sha256(f"{model_path}|{state}".encode()).hexdigest()[:24]
    copy = storage.spool_dir() / f"model-{name}{Path(model_path.name).suffix}"
    if not copy.exists():
        storage.download(model_path, copy)
    return copy


@functools.lru_cache(maxsize=4)
def _load_checked(model_path: str, checksum: str, metadata_json: str) -> LoadedBundle:
    # Cached by checksum so that one process loads each model once however many batches it scores.
    # The autoencoder module registers the preprocessing layers the models hold, which safe mode loads by name.
    from models.autoencoder import keras

    metadata = json.loads(metadata_json)
    try:
        model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a damaged archive
        raise BundleError(f"{model_path}: Keras could not load the model safely ({exc})") from exc
    n_inputs = model.inputs[0].shape[-1]
    if n_inputs != len(metadata["features"]):
        raise BundleError(
            f"{model_path}: the model takes {n_inputs} features but bundle.json lists {len(metadata['features'])}"
        )
    return LoadedBundle(path=Path(model_path).parent, model=model, metadata=metadata)


def promote(models_dir: Path, version: str) -> Path:
    """Point models/current.json at ``version`` by an atomic rewrite; the version must load first."""
    version_dir = models_dir / check_path_part(version, "model_version")
    read_bundle_json(version_dir)
    previous = current_version(models_dir, required=False)
    return storage.write_json(
        models_dir / CURRENT_FILE,
        {"model_version": version, "previous_version": previous, "promoted_at": dt.datetime.now(dt.UTC).isoformat()},
    )


def promote_command(version: str) -> str:
    """Return the command that makes ``version`` current by hand."""
    return f"anomaly promote {version}"


def newest_version_not_promoted(models_dir: Path) -> tuple[str, str] | None:
    """Return the newest usable version with why it is not current, or None.

    It was refused by the gate, or saved without promotion.
    """
    usable = [v for v in list_versions(models_dir) if v.get("usable")]
    if not usable:
        return None
    newest = usable[-1]
    gate = newest.get("promotion_gate") or {}
    if gate and not gate.get("passed", True):
        return newest["model_version"], f"its promotion gate refused it: {'; '.join(gate.get('reasons', []))}"
    return newest["model_version"], "it was saved without being promoted"


def current_version(models_dir: Path, required: bool = True) -> str | None:
    """Return the version models/current.json names, or raise if there is none and ``required``."""
    path = models_dir / CURRENT_FILE
    try:
        version = storage.read_json(path)["model_version"]
    except FileNotFoundError:
        if not required:
            return None
        waiting = newest_version_not_promoted(models_dir)
        if waiting is not None:
            name, why = waiting
            raise BundleError(
                f"{path}: no current model; model {name} was trained but {why}. Promote it with: "
                f"{promote_command(name)}; or retrain (anomaly retrain)"
            ) from None
        raise BundleError(f"{path}: no current model; run the retraining flow first (anomaly retrain)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BundleError(f"{path}: damaged ({exc}); promote a version again with anomaly promote VERSION") from exc
    return check_path_part(str(version), "model_version")


def discard_staging(staging: str | os.PathLike[str]) -> None:
    """Remove an unpublished staging folder after a failed retraining run."""
    path = storage.as_path(staging)
    if path.name.endswith(STAGING_SUFFIX):
        storage.remove_tree(path)


@contextlib.contextmanager
def discarded_on_failure(staging: str | os.PathLike[str]) -> Iterator[None]:
    """Remove the staging folder if the block fails (or is interrupted), then let the error through."""
    try:
        yield
    except BaseException:
        discard_staging(staging)
        raise
