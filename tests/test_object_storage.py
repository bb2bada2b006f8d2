"""The workspace in object storage (S3 on loopback): both flows, bad input, kills, concurrent runs and Dask."""

from __future__ import annotations

import datetime as dt
import shutil
import threading
import time

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import locks, storage
from data.errors import AnomalyJobError
from data.workspace import Workspace
from tests.conftest import FAST_OVERRIDES, RUN_DATE, make_rows, write_rows
from tests.object_store import loopback_s3
from tests.test_operations import EXPECTED_REJECTIONS, _cli, _kill_when, bad_input_night, score_twice_at_once

LEASE_S = 3


@pytest.fixture(scope="module")
def s3():
    """One loopback S3 server for the module; leases last a few seconds so that a killed run's lock expires quickly."""
    with loopback_s3({locks.LEASE_ENV: str(LEASE_S)}) as server:
        yield server


_prefixes = iter(range(1_000_000))


@pytest.fixture()
def s3_root(s3) -> str:
    """A fresh, empty prefix in the test bucket."""
    return f"{s3.bucket('anomaly-tests')}/ws-{next(_prefixes)}"


@pytest.fixture()
def s3_workspace(s3, s3_root, trained_workspace) -> str:
    """The session's trained workspace, copied into the bucket."""
    return s3.upload_tree(trained_workspace, s3_root)


def _table(s3, uri: str, columns=None) -> pa.Table:
    return pq.read_table(uri.removeprefix("s3://"), filesystem=s3.fs, columns=columns)


# The storage module on its own


def test_files_are_written_read_listed_fingerprinted_and_removed_in_a_bucket(s3, s3_root):
    root = storage.as_path(s3_root)
    assert (
        storage.is_remote(root)
        and not storage.is_remote(storage.as_path("/tmp/x"))
        and not storage.is_remote(storage.as_path("file:///tmp/x"))
    )
    storage.write_json(root / "a" / "one.json", {"n": 1})
    storage.write_text(root / "a" / "sub" / "two.json", "{}")
    storage.write_text(root / "a" / ".hidden.json", "{}")
    assert storage.read_json(root / "a" / "one.json") == {"n": 1}
    assert [p.name for p in storage.list_files(root / "a", "*.json")] == ["one.json"]
    assert [p.name for p in storage.list_files(root / "a", "*.json", recursive=True)] == ["one.json", "two.json"]
    assert [p.name for p in storage.list_dirs(root / "a")] == ["sub"]
    assert (
        storage.list_files(root / "nothing-here") == [] and storage.read_json_if_present(root / "missing.json") is None
    )

    before = storage.file_state(root / "a" / "one.json")
    time.sleep(1.1)  # S3 modification times have whole seconds
    storage.write_json(root / "a" / "one.json", {"n": 2})
    assert storage.file_state(root / "a" / "one.json") != before
    assert storage.fingerprint(root / "a" / "one.json").sha256 == storage.content_hash(root / "a" / "one.json")

    with pytest.raises(RuntimeError), storage.staged_path(root / "a" / "failed.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert not storage.is_file(root / "a" / "failed.json") and not tmp.exists(), (
        "nothing is uploaded, and the spool file is gone"
    )

    assert storage.remove(root / "a" / "one.json") and not storage.remove(root / "a" / "one.json")
    storage.remove_tree(root / "a")
    assert s3.keys(s3_root) == []


def test_a_published_folder_uploads_its_record_last_and_replaces_an_older_one(s3, s3_root, tmp_path):
    root = storage.as_path(s3_root)
    staging = tmp_path / "v1.partial"
    for name in ("bundle.json", "model.keras", "report/r.md"):
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text(name)
    storage.write_text(root / "v1" / "stale.txt", "from an older upload")
    uploads: list[str] = []
    put_file = root.fs.put_file
    root.fs.put_file = lambda local, key, **kw: (uploads.append(key.rsplit("/", 1)[-1]), put_file(local, key, **kw))
    try:
        storage.publish_dir(staging, root / "v1", last="bundle.json")
    finally:
        del root.fs.put_file
    assert uploads[-1] == "bundle.json" and sorted(uploads) == ["bundle.json", "model.keras", "r.md"]
    assert s3.keys(f"{s3_root}/v1") == ["bundle.json", "model.keras", "report/r.md"]
    assert not staging.exists()


def test_a_lease_is_held_by_one_run_renewed_while_held_and_taken_over_once_expired(s3, s3_root):
    path = storage.as_path(s3_root) / "locks" / "score.lock"
    entered = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with locks.lock(path):
            entered.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert entered.wait(30)
    try:
        with pytest.raises(locks.LockBusyError, match="held by another run"), locks.lock(path, timeout_s=0):
            pass
        time.sleep(LEASE_S * 1.5)  # past the lease: only renewal keeps it
        with (
            pytest.raises(locks.LockTimeoutError, match="another run has held this lease"),
            locks.lock(path, timeout_s=0.5),
        ):
            pass
    finally:
        release.set()
        holder.join()
    assert not storage.is_file(path), "released leases are removed"

    # A run that died leaves its lease behind; it protects nothing once expired.
    expired = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)).isoformat()
    storage.write_json(path, {"owner": "a run that died", "expires_at": expired})
    with locks.lock(path, timeout_s=5):
        assert storage.read_json(path)["owner"] != "a run that died"


def test_a_version_whose_upload_did_not_finish_is_refused_and_removed_by_the_next_retraining(
    s3, s3_workspace, trained_workspace
):
    from data.errors import BundleError
    from models import bundle

    ws = Workspace.at(s3_workspace)
    current = bundle.current_version(ws.models_dir)
    # A retraining killed mid-upload: every file but bundle.json, which goes last.
    unfinished = "20991231T000000Z"
    s3.upload_tree(trained_workspace / "models" / current, str(ws.version_dir(unfinished)))
    storage.remove(ws.version_dir(unfinished) / bundle.BUNDLE_FILE)
    with pytest.raises(BundleError, match="bundle.json: missing"):
        bundle.promote(ws.models_dir, unfinished)
    assert bundle.current_version(ws.models_dir) == current
    assert [p.name for p in bundle.remove_stale_staging(ws.models_dir)] == [unfinished]
    assert [v["model_version"] for v in bundle.list_versions(ws.models_dir)] == [current]
    assert bundle.load_bundle(ws.version_dir(current)).version == current, "the model loads from the bucket"


def test_a_model_in_a_bucket_is_downloaded_once_per_version_of_its_object_and_checked_each_load(
    s3, s3_workspace, trained_workspace, monkeypatch
):
    from data.errors import BundleError
    from models import bundle

    ws = Workspace.at(s3_workspace)
    version_dir = ws.version_dir(bundle.current_version(ws.models_dir))
    model_uri = str(version_dir / bundle.MODEL_FILE)
    downloads = []
    real_download = storage.download
    monkeypatch.setattr(storage, "download", lambda *args: downloads.append(args) or real_download(*args))
    first = bundle.load_bundle(version_dir)
    assert bundle.load_bundle(version_dir).model is first.model
    assert len(downloads) == 1, "a second load reuses the local copy of the unchanged object"
    original = s3.fs.cat_file(model_uri)
    s3.fs.pipe_file(model_uri, original + b"tampered")
    with pytest.raises(BundleError, match="checksum .* does not match bundle.json"):
        bundle.load_bundle(version_dir)
    assert len(downloads) == 2, "a replaced object is downloaded again"
    s3.fs.pipe_file(model_uri, original)
    assert bundle.load_bundle(version_dir).version == first.version


def test_explicit_batch_paths_may_be_files_folders_or_globs_in_a_bucket(s3, s3_root, tmp_path):
    from data.parquet import resolve_parquet_files

    write_rows(make_rows(5, 0), tmp_path / "night" / "a.parquet")
    write_rows(make_rows(5, 1), tmp_path / "night" / "sub" / "b.parquet")
    (tmp_path / "night" / "notes.txt").write_text("not a batch")
    s3.upload_tree(tmp_path / "night", f"{s3_root}/drop")
    names = lambda found: [str(p).removeprefix(f"{s3_root}/drop/") for p in found]  # noqa: E731
    assert names(resolve_parquet_files(f"{s3_root}/drop")) == ["a.parquet", "sub/b.parquet"]
    assert names(resolve_parquet_files(f"{s3_root}/drop/a.parquet")) == ["a.parquet"]
    assert names(resolve_parquet_files(f"{s3_root}/drop/*/*.parquet")) == ["sub/b.parquet"]
    assert resolve_parquet_files(f"{s3_root}/nothing") == []


def test_a_workspace_in_a_missing_bucket_is_refused_naming_it(s3):
    with pytest.raises(
        AnomalyJobError, match="workspace='s3://no-such-bucket/ws': bucket 'no-such-bucket' does not exist"
    ):
        Workspace.at("s3://no-such-bucket/ws")


def test_a_bad_lease_length_is_refused_naming_the_setting(monkeypatch):
    monkeypatch.setenv(locks.LEASE_ENV, "soon")
    with pytest.raises(AnomalyJobError, match=locks.LEASE_ENV):
        locks.lease_seconds()


# The flows end to end


@pytest.mark.slow
def test_retraining_scoring_a_bad_input_night_evaluation_and_rollback_all_run_in_a_bucket(
    harness, s3, s3_root, tmp_path
):
    from flows.evaluate import evaluate_flow
    from flows.retrain import retrain_flow
    from flows.score import BatchesFailedError, score_flow
    from models.bundle import current_version

    local = tmp_path / "local"
    write_rows(make_rows(6_000, seed=1, anomaly_share=0.02), local / "training" / "train.parquet")
    rows = bad_input_night(local / "incoming" / RUN_DATE.isoformat())
    s3.upload_tree(local, s3_root)
    ws = Workspace.at(s3_root)
    assert str(ws.root) == s3_root

    # The bad-input night's rows with gaps are quarantined, as a model trained to quarantine them does.
    overrides = {k: v for k, v in FAST_OVERRIDES.items() if k in ("epochs", "batch_size")} | {
        "missing_values": "quarantine"
    }
    first = retrain_flow(workspace=s3_root, seed=3, **overrides)
    second = retrain_flow(workspace=s3_root, seed=4, **overrides)
    assert first["promoted"] and second["model_dir"] == f"{s3_root}/models/{second['model_version']}"
    assert current_version(ws.models_dir) == second["model_version"]
    assert {"bundle.json", "model.keras", "promotion.json", "report/training-report.md"} <= set(
        s3.keys(second["model_dir"])
    )

    with pytest.raises(BatchesFailedError, match=r"7 of 14 batch\(es\) failed") as caught:
        score_flow(workspace=s3_root, run_date=RUN_DATE)
    outcome = caught.value.outcome
    for name, (code, column) in EXPECTED_REJECTIONS.items():
        record = storage.read_json(ws.output_partition("rejected", RUN_DATE) / f"{name}.json")
        assert (record["code"], record["column"]) == (code, column), name
        assert f"{name}.parquet" in record["error"], name
    scored = set(rows) - set(EXPECTED_REJECTIONS)
    assert sorted(p.stem for p in storage.list_files(ws.state_dir / "scored" / f"date={RUN_DATE}")) == sorted(scored)
    assert s3.keys(str(ws.state_dir / "locks")) == [], "no lease is left behind"

    # Downstream readers read the outputs straight from the bucket.
    scores = pd.read_parquet(
        f"{s3_root}/outputs/scores", storage_options={"endpoint_url": s3.endpoint, "use_listings_cache": False}
    )
    assert len(scores) == outcome["rows_scored"] and scores["row_id"].is_unique and set(scores["batch"]) == scored
    assert set(scores["model_version"]) == {second["model_version"]}
    con = duckdb.connect()
    con.register_filesystem(s3.fs)
    flagged = con.execute(
        f"SELECT count(*) FROM read_parquet('{s3_root}/outputs/flagged/*/*.parquet', hive_partitioning = true)"
    ).fetchone()[0]
    assert flagged == outcome["rows_flagged"] > 0
    assert len(_table(s3, f"{s3_root}/outputs/quarantine/date={RUN_DATE}")) == outcome["rows_quarantined"] == 8

    # A rerun skips what is published and fails the same bad files again.
    with pytest.raises(BatchesFailedError) as rerun:
        score_flow(workspace=s3_root, run_date=RUN_DATE)
    assert (rerun.value.outcome["batches_scored"], rerun.value.outcome["batches_skipped"]) == (0, len(scored))

    # Labels arrive later: the evaluation joins them to the scores in the bucket.
    labels = pa.table({"row_id": scores["row_id"].to_numpy(), "label": pa.array([0] * len(scores))})
    with storage.staged_path(ws.root / "labels" / "night.parquet") as tmp:
        pq.write_table(labels, tmp)
    evaluated = evaluate_flow(workspace=s3_root, end_date=RUN_DATE, window_days=1)
    evaluation = _table(s3, f"{s3_root}/outputs/evaluation/date={RUN_DATE}/evaluation.parquet").to_pylist()
    assert evaluated["dates_evaluated"] == [RUN_DATE.isoformat()] and evaluated["label_rows"] == len(scores)
    assert [row["rows_labelled"] for row in evaluation] == [len(scores)] and evaluation[0]["precision"] == 0.0
    assert storage.is_file(ws.outputs_dir / "reports" / "evaluation-trend" / "evaluation-trend.png")

    # Rolling back to the first model: the next scoring of the night uses it.
    from models.bundle import promote

    promote(ws.models_dir, first["model_version"])
    with pytest.raises(BatchesFailedError) as rolled:
        score_flow(workspace=s3_root, run_date=RUN_DATE)
    assert rolled.value.outcome["model_version"] == first["model_version"] and rolled.value.outcome[
        "batches_scored"
    ] == len(scored)
    rescored = pd.read_parquet(
        f"{s3_root}/outputs/scores", storage_options={"endpoint_url": s3.endpoint, "use_listings_cache": False}
    )
    assert set(rescored["model_version"]) == {first["model_version"]} and len(rescored) == len(scores)


def _outputs(s3, root: str, kind: str) -> pa.Table:
    table = (
        _table(s3, f"{root}/outputs/{kind}/date={RUN_DATE}")
        if root.startswith("s3://")
        else pq.read_table(Workspace.at(root).output_partition(kind, RUN_DATE))
    )
    return table.select([c for c in table.column_names if c not in ("scored_at", "quarantined_at", "date")]).sort_by(
        [("batch", "ascending"), ("row_id", "ascending")]
    )


@pytest.mark.slow
def test_a_scoring_run_killed_mid_upload_publishes_nothing_partial_and_the_rerun_equals_a_clean_run(
    harness, s3, s3_workspace, trained_workspace, tmp_path, monkeypatch
):
    from flows.score import score_flow

    clean = tmp_path / "clean"
    shutil.copytree(trained_workspace, clean)
    night = Workspace.at(clean).incoming_for(RUN_DATE)
    write_rows(make_rows(300_000, 12, anomaly_share=0.01), night / "big.parquet", row_group_size=50_000)
    write_rows(make_rows(2000, 13, start_id=2_000_000), night / "small.parquet")
    s3.upload_tree(night, f"{s3_workspace}/incoming/{RUN_DATE}")
    score_flow(workspace=str(clean), run_date=RUN_DATE)

    ws = Workspace.at(s3_workspace)
    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setenv("TMPDIR", str(spool))  # the killed process's spool, to watch it write
    process = _cli(
        "score",
        "--run-date",
        RUN_DATE.isoformat(),
        "--chunk-rows",
        "8192",
        workspace=s3_workspace,
        home=tmp_path / "prefect",
    )
    _kill_when(process, lambda: any((spool / "anomaly-spool").glob(".big.parquet.*.tmp")))
    for kind in ("flagged", "scores"):
        assert not storage.is_file(ws.output_partition(kind, RUN_DATE) / "big.parquet"), kind
    assert not storage.is_file(ws.state_dir / "scored" / f"date={RUN_DATE}" / "big.json")
    assert s3.keys(str(ws.state_dir / "locks")) == [f"score-{RUN_DATE}.lock"], (
        "the killed run's lease stays until it expires"
    )

    rerun = score_flow(workspace=s3_workspace, run_date=RUN_DATE)
    assert rerun["batches_scored"] + rerun["batches_skipped"] == 2
    for kind in ("flagged", "scores"):
        assert _outputs(s3, s3_workspace, kind).equals(_outputs(s3, str(clean), kind)), kind
    assert s3.keys(str(ws.state_dir / "locks")) == []


@pytest.mark.slow
def test_two_scoring_processes_of_one_date_in_a_bucket_write_every_row_once(s3, s3_workspace, tmp_path):
    ws = Workspace.at(s3_workspace)
    local = tmp_path / "night"
    for i in range(3):
        write_rows(make_rows(10_000, 20 + i, start_id=i * 10_000), local / f"part-{i}.parquet")
    s3.upload_tree(local, str(ws.incoming_for(RUN_DATE)))
    score_twice_at_once(s3_workspace, tmp_path)
    scores = _outputs(s3, s3_workspace, "scores").to_pandas()
    assert len(scores) == 30_000 and scores["row_id"].is_unique


@pytest.mark.slow
def test_dask_workers_read_their_units_from_and_write_their_parts_to_the_bucket(
    harness, s3, s3_workspace, trained_workspace, tmp_path
):
    from flows.score import score_flow
    from models.runtime import cpu_threads

    single = tmp_path / "single"
    shutil.copytree(trained_workspace, single)
    night = Workspace.at(single).incoming_for(RUN_DATE)
    for i in range(2):
        table = make_rows(40_000, 50 + i, anomaly_share=0.01, start_id=i * 100_000)
        if i == 1:
            values = table.column("f2").to_numpy().copy()
            values[[7, 30_000]] = float("nan")
            table = table.set_column(3, "f2", pa.array(values))
        write_rows(table, night / f"part-{i}.parquet", row_group_size=10_000)
    s3.upload_tree(night, f"{s3_workspace}/incoming/{RUN_DATE}")

    alone = score_flow(workspace=str(single), run_date=RUN_DATE)
    spread = score_flow(
        workspace=s3_workspace,
        run_date=RUN_DATE,
        dask_workers=2,
        dask_threads_per_worker=cpu_threads(),
        rows_per_unit=20_000,
    )
    for key in ("rows_read", "rows_scored", "rows_flagged", "rows_quarantined", "batches_scored"):
        assert alone[key] == spread[key], key
    for kind in ("flagged", "scores", "quarantine"):
        ours, theirs = _outputs(s3, str(single), kind), _outputs(s3, s3_workspace, kind)
        assert ours.schema.equals(theirs.schema) and ours.to_pandas().equals(theirs.to_pandas()), kind
    assert not [k for k in s3.keys(s3_workspace) if k.startswith("state/parts/")], (
        "every unit part is merged and removed"
    )
