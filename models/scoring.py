"""Scoring one batch file in a single streaming pass: check, score, flag, write flagged rows, scores and quarantine."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.atomic import atomic_path, write_json_atomic
from data.batches import rejection_path
from data.errors import BatchFileError, SchemaError
from data.parquet import DEFAULT_CHUNK_ROWS, check_batch_schema, content_hash, feature_matrix, iter_record_batches, open_parquet, plan_row_group_units
from data.workspace import Workspace, check_path_part
from models.bundle import LoadedBundle, load_bundle, read_bundle_json
from models.reports import combine_summaries, summarize_errors

ADDED_COLUMNS = ("reconstruction_error", "threshold", "is_anomaly", "model_version", "batch", "scored_at")
SCORE_COLUMNS = ("reconstruction_error", "is_anomaly", "model_version", "batch")
QUARANTINE_COLUMNS = ("reason_code", "reason_column", "batch", "model_version", "quarantined_at")
SCHEMA_VERSION = "1"
OUTPUT_KINDS = ("flagged", "scores", "quarantine")


@dataclass
class BatchOutputs:
    """Where one batch's outputs go; ``scores`` and ``quarantine`` may be None to skip them."""

    flagged: Path
    scores: Path | None
    quarantine: Path

    def published(self, quarantined: bool) -> dict[str, str | None]:
        """Return the paths actually written: scores only if asked for, quarantine only if rows went there."""
        return {
            "flagged": str(self.flagged),
            "scores": str(self.scores) if self.scores is not None else None,
            "quarantine": str(self.quarantine) if quarantined else None,
        }


@dataclass
class BatchResult:
    """What scoring one batch produced, small enough to pass between tasks."""

    batch: str
    source: str
    rows_read: int
    rows_scored: int
    rows_flagged: int
    rows_quarantined: int
    outputs: dict[str, str | None]
    summary: dict[str, Any] = field(repr=False, default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict."""
        return {
            "batch": self.batch,
            "source": self.source,
            "rows_read": self.rows_read,
            "rows_scored": self.rows_scored,
            "rows_flagged": self.rows_flagged,
            "rows_quarantined": self.rows_quarantined,
            "outputs": self.outputs,
            "summary": self.summary,
        }


def _output_metadata(bundle: LoadedBundle) -> dict[bytes, bytes]:
    return {
        b"anomaly.model_version": bundle.version.encode(),
        b"anomaly.threshold": repr(bundle.threshold).encode(),
        b"anomaly.percentile": repr(bundle.percentile).encode(),
        b"anomaly.schema_version": SCHEMA_VERSION.encode(),
    }


def _constant(value: Any, type_: pa.DataType, n: int) -> pa.Array:
    return pa.repeat(pa.scalar(value, type=type_), n)


def _parquet_writer(path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    # Only text columns are dictionary-encoded: on unique floats and ids pyarrow builds a dictionary and
    # then gives it up, which makes writing scores 4x slower and the file larger.
    text = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type) or pa.types.is_dictionary(f.type)]
    return pq.ParquetWriter(path, schema, use_dictionary=text)


def score_batch_file(
    bundle: LoadedBundle,
    source: Path,
    batch: str,
    outputs: BatchOutputs,
    scored_at: dt.datetime,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    max_bad_row_share: float = 0.1,
    id_columns: Sequence[str] | None = None,
    row_groups: Sequence[int] | None = None,
) -> BatchResult:
    """Score ``source`` (or only ``row_groups`` of it) in bounded memory; outputs appear only once all of it succeeded.

    Scoring some row groups is one unit of a file split across workers: the bad-row share is then
    left to :func:`merge_batch_parts`, which sees the whole file, and no summary is computed.
    """
    features = bundle.feature_names
    schema = check_batch_schema(source, features)
    whole_file = row_groups is None
    clash = sorted(set(schema.columns) & set(ADDED_COLUMNS))
    if clash:
        raise SchemaError(source, "input already has a column the output adds; rename it", column=clash[0], code="reserved_column")
    keep = list(id_columns) if id_columns is not None else schema.passthrough_columns
    missing_ids = [c for c in keep if c not in schema.columns]
    if missing_ids:
        raise SchemaError(source, "identifying column requested for the scores output is missing", column=missing_ids[0], code="missing_column")
    label = bundle.label_column if bundle.label_column in schema.columns else None

    scorer = bundle.scorer
    threshold = bundle.threshold
    metadata = _output_metadata(bundle)
    input_schema = pq.ParquetFile(source).schema_arrow
    flagged_schema = pa.schema(
        list(input_schema)
        + [
            pa.field("reconstruction_error", pa.float64()),
            pa.field("threshold", pa.float64()),
            pa.field("is_anomaly", pa.bool_()),
            pa.field("model_version", pa.string()),
            pa.field("batch", pa.string()),
            pa.field("scored_at", pa.timestamp("us", tz="UTC")),
        ],
        metadata=metadata,
    )
    scores_schema = pa.schema(
        [input_schema.field(c) for c in keep]
        + [
            pa.field("reconstruction_error", pa.float64()),
            pa.field("is_anomaly", pa.bool_()),
            pa.field("model_version", pa.string()),
            pa.field("batch", pa.string()),
        ],
        metadata=metadata,
    )
    quarantine_schema = pa.schema(
        list(input_schema)
        + [
            pa.field("reason_code", pa.string()),
            pa.field("reason_column", pa.string()),
            pa.field("batch", pa.string()),
            pa.field("model_version", pa.string()),
            pa.field("quarantined_at", pa.timestamp("us", tz="UTC")),
        ],
        metadata=metadata,
    )

    metadata_rows = pq.ParquetFile(source).metadata
    n_rows = schema.num_rows if whole_file else sum(metadata_rows.row_group(g).num_rows for g in row_groups)
    errors = np.empty(n_rows, dtype=np.float64)
    truth = np.zeros(n_rows, dtype=bool) if label else None
    label_usable = label is not None
    rows_read = rows_scored = rows_flagged = rows_quarantined = 0
    with contextlib.ExitStack() as stack:
        flagged_tmp = stack.enter_context(atomic_path(outputs.flagged))
        flagged_writer = stack.enter_context(_parquet_writer(flagged_tmp, flagged_schema))
        scores_writer = None
        if outputs.scores is not None:
            scores_tmp = stack.enter_context(atomic_path(outputs.scores))
            scores_writer = stack.enter_context(_parquet_writer(scores_tmp, scores_schema))
        quarantine_writer: pq.ParquetWriter | None = None

        for record_batch in iter_record_batches(source, chunk_rows, row_groups):
            n = record_batch.num_rows
            rows_read += n
            matrix = feature_matrix(record_batch, features)
            finite = np.isfinite(matrix)
            if not finite.all():
                good = finite.all(axis=1)
                bad_rows = record_batch.filter(pa.array(~good))
                if quarantine_writer is None:
                    quarantine_tmp = stack.enter_context(atomic_path(outputs.quarantine))
                    quarantine_writer = stack.enter_context(_parquet_writer(quarantine_tmp, quarantine_schema))
                quarantine_writer.write_batch(_quarantine_rows(bad_rows, matrix[~good], features, batch, bundle.version, scored_at, quarantine_schema))
                rows_quarantined += bad_rows.num_rows
                record_batch = record_batch.filter(pa.array(good))
                matrix = matrix[good]
                n = record_batch.num_rows
                if n == 0:
                    continue
            chunk_errors = scorer(matrix)
            errors[rows_scored : rows_scored + n] = chunk_errors
            if label:
                label_column = record_batch.column(label)
                if label_column.null_count:
                    label_usable = False
                else:
                    truth[rows_scored : rows_scored + n] = labelled_anomalies(label_column, bundle.normal_label)
            is_anomaly = chunk_errors > threshold
            error_array = pa.array(chunk_errors, type=pa.float64())
            flag_array = pa.array(is_anomaly, type=pa.bool_())
            version_array = _constant(bundle.version, pa.string(), n)
            batch_array = _constant(batch, pa.string(), n)
            n_flagged = int(is_anomaly.sum())
            if n_flagged:
                picked = pa.array(np.flatnonzero(is_anomaly))
                flagged_writer.write_batch(
                    pa.RecordBatch.from_arrays(
                        [c.take(picked) for c in record_batch.columns]
                        + [
                            error_array.take(picked),
                            _constant(threshold, pa.float64(), n_flagged),
                            flag_array.take(picked),
                            version_array.take(picked),
                            batch_array.take(picked),
                            _constant(scored_at, pa.timestamp("us", tz="UTC"), n_flagged),
                        ],
                        schema=flagged_schema,
                    )
                )
            if scores_writer is not None:
                scores_writer.write_batch(
                    pa.RecordBatch.from_arrays(
                        [record_batch.column(c) for c in keep] + [error_array, flag_array, version_array, batch_array],
                        schema=scores_schema,
                    )
                )
            rows_scored += n
            rows_flagged += n_flagged

        if whole_file:
            check_bad_row_share(source, rows_read, rows_quarantined, max_bad_row_share)
    if rows_quarantined == 0:
        # A rerun that finds no bad rows must not leave an earlier run's quarantine file behind.
        outputs.quarantine.unlink(missing_ok=True)

    summary: dict[str, Any] = {}
    if whole_file:
        truth_scored = truth[:rows_scored] if (truth is not None and label_usable) else None
        summary = summarize_errors(errors[:rows_scored], threshold, bundle.percentile, truth_scored)
        summary["rows_read"] = rows_read
        summary["rows_quarantined"] = rows_quarantined
    return BatchResult(
        batch=batch,
        source=str(source),
        rows_read=rows_read,
        rows_scored=rows_scored,
        rows_flagged=rows_flagged,
        rows_quarantined=rows_quarantined,
        outputs=outputs.published(quarantined=rows_quarantined > 0),
        summary=summary,
    )


def labelled_anomalies(labels: pa.Array | pa.ChunkedArray, normal_label: str) -> np.ndarray:
    """Return True where the label is not the normal value (labels compared as text)."""
    return labels.cast(pa.string()).to_numpy(zero_copy_only=False) != normal_label


def check_bad_row_share(source: Path, rows_read: int, rows_quarantined: int, max_bad_row_share: float) -> None:
    """Fail the whole file when more than ``max_bad_row_share`` of its rows could not be scored."""
    if rows_read and rows_quarantined / rows_read > max_bad_row_share:
        raise BatchFileError(
            source,
            f"{rows_quarantined} of {rows_read} rows have missing or infinite feature values, more than "
            f"max_bad_row_share={max_bad_row_share:g}; fix the file or raise the parameter",
            code="too_many_bad_rows",
        )


def _concatenate(parts: Sequence[Path], target: Path) -> None:
    """Copy the row groups of ``parts``, in order, into one file written atomically at ``target``."""
    schema = pq.read_schema(parts[0])
    with atomic_path(target) as tmp, _parquet_writer(tmp, schema) as writer:
        for part in parts:
            for batch in open_parquet(part, streaming=True).iter_batches(batch_size=DEFAULT_CHUNK_ROWS):
                writer.write_batch(batch)


def merge_batch_parts(
    bundle: LoadedBundle,
    source: Path,
    batch: str,
    unit_results: Sequence[dict[str, Any]],
    outputs: BatchOutputs,
    max_bad_row_share: float,
) -> BatchResult:
    """Join the units of one file, in row-group order, into the batch's outputs and summarise the whole file."""
    rows_read = sum(r["rows_read"] for r in unit_results)
    rows_quarantined = sum(r["rows_quarantined"] for r in unit_results)
    check_bad_row_share(source, rows_read, rows_quarantined, max_bad_row_share)
    score_parts = [Path(r["outputs"]["scores"]) for r in unit_results]
    label = bundle.label_column if bundle.label_column in pq.read_schema(score_parts[0]).names else None
    columns = ["reconstruction_error"] + ([label] if label else [])
    scored = pa.concat_tables([pq.read_table(p, columns=columns) for p in score_parts])
    truth = None
    if label and scored.column(label).null_count == 0:
        truth = labelled_anomalies(scored.column(label), bundle.normal_label)
    summary = summarize_errors(scored.column("reconstruction_error").to_numpy(), bundle.threshold, bundle.percentile, truth)
    summary["rows_read"] = rows_read
    summary["rows_quarantined"] = rows_quarantined
    del scored

    _concatenate([Path(r["outputs"]["flagged"]) for r in unit_results], outputs.flagged)
    if outputs.scores is not None:
        _concatenate(score_parts, outputs.scores)
    quarantine_parts = [Path(r["outputs"]["quarantine"]) for r in unit_results if r["outputs"]["quarantine"]]
    if quarantine_parts:
        _concatenate(quarantine_parts, outputs.quarantine)
    else:
        outputs.quarantine.unlink(missing_ok=True)
    return BatchResult(
        batch=batch,
        source=str(source),
        rows_read=rows_read,
        rows_scored=summary["rows_scored"],
        rows_flagged=summary["rows_flagged"],
        rows_quarantined=rows_quarantined,
        outputs=outputs.published(quarantined=bool(quarantine_parts)),
        summary=summary,
    )


def _quarantine_rows(
    rows: pa.RecordBatch,
    matrix: np.ndarray,
    features: Sequence[str],
    batch: str,
    version: str,
    when: dt.datetime,
    schema: pa.Schema,
) -> pa.RecordBatch:
    first_bad = np.argmax(~np.isfinite(matrix), axis=1)
    bad_values = matrix[np.arange(len(matrix)), first_bad]
    codes = np.where(np.isnan(bad_values), "missing_value", "infinite_value")
    n = rows.num_rows
    return pa.RecordBatch.from_arrays(
        list(rows.columns)
        + [
            pa.array(codes, type=pa.string()),
            pa.array([features[i] for i in first_bad], type=pa.string()),
            _constant(batch, pa.string(), n),
            _constant(version, pa.string(), n),
            _constant(when, pa.timestamp("us", tz="UTC"), n),
        ],
        schema=schema,
    )


def batch_outputs(workspace: Workspace, run_date: dt.date, batch: str, write_scores: bool) -> BatchOutputs:
    """Return the output paths of one batch under the date's Hive partitions."""
    file_name = f"{check_path_part(batch, 'batch')}.parquet"
    return BatchOutputs(
        flagged=workspace.output_partition("flagged", run_date) / file_name,
        scores=workspace.output_partition("scores", run_date) / file_name if write_scores else None,
        quarantine=workspace.output_partition("quarantine", run_date) / file_name,
    )


def batch_report_dir(workspace: Workspace, run_date: dt.date) -> Path:
    """Return the folder of per-batch reports for a date."""
    return workspace.output_partition("reports", run_date) / "batches"


def score_batch(
    workspace_root: str,
    run_date: dt.date,
    batch: str,
    source: str,
    model_version: str,
    write_scores: bool = True,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    max_bad_row_share: float = 0.1,
    scored_at: dt.datetime | None = None,
) -> dict[str, Any]:
    """Score one batch file with a model version of the workspace and return its result as a dict."""
    workspace = Workspace.at(workspace_root)
    bundle = load_bundle(workspace.version_dir(model_version))
    result = score_batch_file(
        bundle,
        Path(source),
        batch,
        batch_outputs(workspace, run_date, batch, write_scores),
        scored_at or dt.datetime.now(dt.UTC),
        chunk_rows=chunk_rows,
        max_bad_row_share=max_bad_row_share,
    )
    # Hashed here rather than when the manifest is written, so that on Dask the workers hash side by side.
    return {**result.to_dict(), "content_sha256": content_hash(Path(source))}


def parts_dir(workspace: Workspace, run_date: dt.date, batch: str) -> Path:
    """Return the private folder holding the per-unit outputs of one file split across workers."""
    return workspace.state_dir / "parts" / f"date={run_date.isoformat()}" / check_path_part(batch, "batch")


def plan_units(source: str, rows_per_unit: int) -> list[list[int]]:
    """Return the row-group units one file is scored in (a single unit for a small file)."""
    return plan_row_group_units(Path(source), rows_per_unit)


def score_unit(
    workspace_root: str,
    run_date: dt.date,
    batch: str,
    source: str,
    model_version: str,
    unit: int,
    row_groups: Sequence[int],
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    scored_at: dt.datetime | None = None,
) -> dict[str, Any]:
    """Score some row groups of a file into private part files; the worker loads the model once per process."""
    workspace = Workspace.at(workspace_root)
    bundle = load_bundle(workspace.version_dir(model_version))
    folder = parts_dir(workspace, run_date, batch) / f"unit-{unit:05d}"
    outputs = BatchOutputs(flagged=folder / "flagged.parquet", scores=folder / "scores.parquet", quarantine=folder / "quarantine.parquet")
    result = score_batch_file(bundle, Path(source), batch, outputs, scored_at or dt.datetime.now(dt.UTC), chunk_rows=chunk_rows, row_groups=row_groups)
    return result.to_dict()


def merge_units(
    workspace_root: str,
    run_date: dt.date,
    batch: str,
    source: str,
    model_version: str,
    unit_results: Sequence[dict[str, Any]],
    write_scores: bool = True,
    max_bad_row_share: float = 0.1,
) -> dict[str, Any]:
    """Join a file's scored units into its outputs, then drop the part files."""
    workspace = Workspace.at(workspace_root)
    bundle = load_bundle(workspace.version_dir(model_version))
    try:
        result = merge_batch_parts(bundle, Path(source), batch, unit_results, batch_outputs(workspace, run_date, batch, write_scores), max_bad_row_share)
    finally:
        discard_units(workspace_root, run_date, batch)
    return {**result.to_dict(), "content_sha256": content_hash(Path(source))}


def discard_units(workspace_root: str, run_date: dt.date, batch: str) -> None:
    """Remove the part files of one file's units (after a merge, or after a unit failed)."""
    shutil.rmtree(parts_dir(Workspace.at(workspace_root), run_date, batch), ignore_errors=True)


def summarize_run(
    workspace_root: str,
    run_date: dt.date,
    batches: Sequence[str],
    model_version: str,
) -> dict[str, Any]:
    """Combine the batch reports of a date into one summary; AUCs are exact when every batch's scores exist."""
    workspace = Workspace.at(workspace_root)
    bundle_meta = read_bundle_json(workspace.version_dir(model_version))
    threshold = float(bundle_meta["threshold"]["value"])
    percentile = float(bundle_meta["threshold"]["percentile"])
    report_dir = batch_report_dir(workspace, run_date)
    summaries = [json.loads((report_dir / f"{b}.json").read_text(encoding="utf-8")) for b in batches]
    summary = combine_summaries(summaries, threshold, percentile)
    summary["rows_read"] = sum(s.get("rows_read", s["rows_scored"]) for s in summaries)
    summary["rows_quarantined"] = sum(s.get("rows_quarantined", 0) for s in summaries)
    score_files = [workspace.output_partition("scores", run_date) / f"{b}.parquet" for b in batches]
    label_column = str(bundle_meta.get("label_column", "label"))
    if summary["labels"] and score_files and all(p.is_file() for p in score_files):
        tables = [pq.read_table(p, columns=["reconstruction_error", label_column]) for p in score_files if label_column in pq.read_schema(p).names]
        if len(tables) == len(score_files):
            table = pa.concat_tables(tables)
            errors = table.column("reconstruction_error").to_numpy()
            truth = labelled_anomalies(table.column(label_column), str(bundle_meta.get("normal_label", "0")))
            exact = summarize_errors(errors, threshold, percentile, truth)
            summary["labels"] = exact["labels"]
            summary["error_quantiles"] = exact["error_quantiles"]
    return summary


def describe_failure(error: BaseException, source: str) -> dict[str, Any]:
    """Return a JSON-able account of why a batch failed: code, column and message."""
    try:
        rows: int | None = pq.ParquetFile(source).metadata.num_rows
    except Exception:  # unreadable files are exactly the ones that end up here
        rows = None
    return {
        "source": source,
        "rows_in_file": rows,
        "code": getattr(error, "code", type(error).__name__),
        "column": getattr(error, "column", None),
        "error": str(error),
    }


def record_rejected_file(workspace: Workspace, run_date: dt.date, batch: str, rejection: dict[str, Any]) -> Path:
    """Write ``outputs/rejected/date=<date>/<batch>.json`` saying why the whole file was not scored."""
    path = rejection_path(workspace, run_date, check_path_part(batch, "batch"))
    return write_json_atomic(path, {"batch": batch, **rejection, "rejected_at": dt.datetime.now(dt.UTC).isoformat()})
