"""Streaming a Parquet file through the model: check, score, flag and quarantine, chunk by chunk, in bounded memory."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from data.errors import BatchFileError
from data.output_schema import TIMESTAMP, flagged_schema, output_metadata, quarantine_schema, scores_schema
from data.outputs import StagedOutputs
from data.parquet import (
    DEFAULT_CHUNK_ROWS,
    DEFAULT_MAX_BAD_ROW_SHARE,
    check_batch_schema,
    feature_matrix,
    iter_record_batches,
    label_classes,
    parquet_writer,
)
from models.bundle import LoadedBundle
from models.monitoring.drift import FeatureBins
from models.monitoring.error_summary import ErrorDistribution
from models.monitoring.reasons import ReasonTally, explain_rows

FLOAT32_MAX = float(np.finfo(np.float32).max)
DEFAULT_REASON_COUNT = 3


@dataclass(frozen=True)
class ScoringOptions:
    """How batches are scored: when, how many rows at a time and how many reasons per flagged row.

    Also whether every row's score is written, and the bad-row limit.
    """

    scored_at: dt.datetime
    write_scores: bool = True
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    reason_count: int = DEFAULT_REASON_COUNT
    max_bad_row_share: float = DEFAULT_MAX_BAD_ROW_SHARE


@dataclass
class RowCounts:
    """How many rows of a file (or some of its row groups) were read, scored, flagged and quarantined."""

    rows_read: int
    rows_scored: int
    rows_flagged: int
    rows_quarantined: int

    def row_counts(self) -> dict[str, int]:
        """Return the four counters by name."""
        return {
            "rows_read": self.rows_read,
            "rows_scored": self.rows_scored,
            "rows_flagged": self.rows_flagged,
            "rows_quarantined": self.rows_quarantined,
        }


@dataclass
class StreamCounts(RowCounts):
    """What one pass over a file (or some of its row groups) counted, with its error distribution and reasons."""

    distribution: ErrorDistribution
    reasons: ReasonTally
    feature_bins: FeatureBins | None
    # Per categorical feature, how many values were not in its training vocabulary (scored in its unseen slot).
    unseen_categories: dict[str, int] = field(default_factory=dict)


def stream_batch_file(
    bundle: LoadedBundle,
    source: Path,
    batch: str,
    staged: StagedOutputs,
    options: ScoringOptions,
    row_groups: Sequence[int] | None = None,
) -> StreamCounts:
    """Score ``source`` (or only ``row_groups`` of it) into ``staged`` outputs, which the caller publishes or discards.

    Flagged rows get ``options.reason_count`` reasons (0: none), from the residuals of the same forward pass.
    """
    scored_at, chunk_rows = options.scored_at, options.chunk_rows
    features = bundle.feature_names
    vocabularies = bundle.vocabularies
    schema = check_batch_schema(source, features, categorical=vocabularies)
    keep = schema.passthrough_columns
    label = bundle.label_column if bundle.label_column in schema.columns else None

    scorer = bundle.scorer
    threshold = bundle.threshold
    metadata = output_metadata(bundle.version, threshold, bundle.percentile)
    input_schema = schema.arrow_schema
    reason_count = min(options.reason_count, len(features))
    flagged_out = flagged_schema(input_schema, metadata, reason_count)
    scores_out = scores_schema(input_schema, keep, metadata)
    quarantine_out = quarantine_schema(input_schema, metadata)
    distribution = ErrorDistribution(threshold)
    tally = ReasonTally(list(features))
    feature_bins = FeatureBins.for_reference(bundle.drift_reference) if bundle.drift_reference else None
    rows_read = rows_scored = rows_flagged = rows_quarantined = 0
    fills_missing = bundle.fills_missing
    unseen = dict.fromkeys(vocabularies, 0)

    with contextlib.ExitStack() as writers:
        flagged_writer = writers.enter_context(parquet_writer(staged.flagged.tmp, flagged_out, staged.flagged.target))
        scores_writer = (
            writers.enter_context(parquet_writer(staged.scores.tmp, scores_out, staged.scores.target))
            if staged.scores is not None
            else None
        )
        quarantine_writer = None

        for record_batch in iter_record_batches(source, chunk_rows, row_groups):
            rows_read += record_batch.num_rows
            matrix = feature_matrix(record_batch, features, vocabularies=vocabularies)
            for name, vocabulary in vocabularies.items():
                # The code past the vocabulary's last is the unseen slot's.
                unseen[name] += int(np.count_nonzero(matrix[:, features.index(name)] == len(vocabulary)))
            # A missing value (NaN) is scored where the model fills it in; an infinite one never is.
            scorable = ~np.isinf(matrix) if fills_missing else np.isfinite(matrix)
            if not scorable.all():
                good = scorable.all(axis=1)
                if quarantine_writer is None:
                    quarantine_writer = writers.enter_context(
                        parquet_writer(staged.stage_quarantine(), quarantine_out, staged.targets.quarantine)
                    )
                bad_rows = record_batch.filter(pa.array(~good))
                quarantine_writer.write_batch(
                    _quarantine_rows(
                        bad_rows,
                        features,
                        batch,
                        bundle.version,
                        scored_at,
                        quarantine_out,
                        fills_missing,
                        vocabularies,
                    )
                )
                rows_quarantined += bad_rows.num_rows
                record_batch = record_batch.filter(pa.array(good))
                matrix = matrix[good]
                if record_batch.num_rows == 0:
                    continue
            n = record_batch.num_rows
            if reason_count:
                errors, flagged_residuals = scorer.with_flagged_residuals(matrix, threshold)
            else:
                errors = scorer(matrix)
            distribution.add(errors, label_classes(record_batch.column(label), bundle.normal_label) if label else None)
            if feature_bins is not None:
                feature_bins.add(matrix)
            is_anomaly = errors > threshold
            error_array = pa.array(errors, type=pa.float64())
            flag_array = pa.array(is_anomaly, type=pa.bool_())
            version_array = _constant(bundle.version, pa.string(), n)
            batch_array = _constant(batch, pa.string(), n)
            n_flagged = int(is_anomaly.sum())
            if n_flagged:
                picked = pa.array(np.flatnonzero(is_anomaly))
                reason_arrays: list[pa.Array] = []
                if reason_count:
                    reasons = explain_rows(flagged_residuals, bundle.loss, features, reason_count, vocabularies)
                    tally.add(reasons)
                    for k in range(reason_count):
                        reason_arrays += [
                            pa.array(reasons.features[:, k], type=pa.string()),
                            pa.array(reasons.shares[:, k], type=pa.float64()),
                            pa.array(reasons.directions[:, k], type=pa.string()),
                        ]
                flagged_writer.write_batch(
                    pa.RecordBatch.from_arrays(
                        [c.take(picked) for c in record_batch.columns]
                        + [
                            error_array.take(picked),
                            _constant(threshold, pa.float64(), n_flagged),
                            flag_array.take(picked),
                            version_array.take(picked),
                            batch_array.take(picked),
                            _constant(scored_at, TIMESTAMP, n_flagged),
                            *reason_arrays,
                        ],
                        schema=flagged_out,
                    )
                )
            if scores_writer is not None:
                scores_writer.write_batch(
                    pa.RecordBatch.from_arrays(
                        [record_batch.column(c) for c in keep] + [error_array, flag_array, version_array, batch_array],
                        schema=scores_out,
                    )
                )
            rows_scored += n
            rows_flagged += n_flagged
    return StreamCounts(
        rows_read, rows_scored, rows_flagged, rows_quarantined, distribution, tally, feature_bins, unseen
    )


def check_bad_row_share(source: Path, rows_read: int, rows_quarantined: int, max_bad_row_share: float) -> None:
    """Fail the whole file when more than ``max_bad_row_share`` of its rows could not be scored."""
    if rows_read and rows_quarantined / rows_read > max_bad_row_share:
        raise BatchFileError(
            source,
            f"{rows_quarantined} of {rows_read} rows have missing, infinite or out-of-range feature values, more than "
            f"max_bad_row_share={max_bad_row_share:g}; fix the file or raise the parameter",
            code="too_many_bad_rows",
        )


def _constant(value: Any, type_: pa.DataType, n: int) -> pa.Array:
    return pa.repeat(pa.scalar(value, type=type_), n)


def bad_value_reasons(
    rows: pa.RecordBatch,
    features: Sequence[str],
    fills_missing: bool = False,
    vocabularies: Mapping[str, Sequence[str]] | None = None,
) -> tuple[list[str], list[str]]:
    """Return, for each row holding a bad feature, why and the first such feature.

    The reason is ``missing_value`` (unless the model fills missing values in), ``infinite_value`` or
    ``out_of_range``.
    """
    values = feature_matrix(rows, features, dtype=np.float64, vocabularies=vocabularies)
    # Scoring is float32: a finite float64 beyond its range cannot be scored either.
    bad = np.isinf(values) | (np.abs(values) > FLOAT32_MAX)
    if not fills_missing:
        bad |= np.isnan(values)
    first = np.argmax(bad, axis=1)
    first_values = values[np.arange(len(values)), first]
    codes = np.where(
        np.isnan(first_values), "missing_value", np.where(np.isinf(first_values), "infinite_value", "out_of_range")
    )
    return codes.tolist(), [features[i] for i in first]


def _quarantine_rows(
    rows: pa.RecordBatch,
    features: Sequence[str],
    batch: str,
    version: str,
    when: dt.datetime,
    schema: pa.Schema,
    fills_missing: bool,
    vocabularies: Mapping[str, Sequence[str]],
) -> pa.RecordBatch:
    codes, columns = bad_value_reasons(rows, features, fills_missing, vocabularies)
    n = rows.num_rows
    return pa.RecordBatch.from_arrays(
        list(rows.columns)
        + [
            pa.array(codes, type=pa.string()),
            pa.array(columns, type=pa.string()),
            _constant(batch, pa.string(), n),
            _constant(version, pa.string(), n),
            _constant(when, TIMESTAMP, n),
        ],
        schema=schema,
    )
