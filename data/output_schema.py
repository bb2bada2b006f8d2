"""The output datasets' schemas (a public contract), defined once from their column names and types."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

SCHEMA_VERSION = "3"
# Flagged rows may carry up to this many reasons.
MAX_REASONS = 10
OUTPUT_KINDS = ("flagged", "scores", "quarantine")

TIMESTAMP = pa.timestamp("us", tz="UTC")

# Columns each output adds to the input's columns, in order.
FLAGGED_ADDED = (
    ("reconstruction_error", pa.float64()),
    ("threshold", pa.float64()),
    ("is_anomaly", pa.bool_()),
    ("model_version", pa.string()),
    ("batch", pa.string()),
    ("scored_at", TIMESTAMP),
)
SCORES_ADDED = (
    ("reconstruction_error", pa.float64()),
    ("is_anomaly", pa.bool_()),
    ("model_version", pa.string()),
    ("batch", pa.string()),
)
QUARANTINE_ADDED = (
    ("reason_code", pa.string()),
    ("reason_column", pa.string()),
    ("batch", pa.string()),
    ("model_version", pa.string()),
    ("quarantined_at", TIMESTAMP),
)
# The Hive partition column readers add when they read a whole output folder.
PARTITION_COLUMN = "date"

def reason_fields(reason_count: int) -> tuple[tuple[str, pa.DataType], ...]:
    """The reason columns: ``reason_k``, ``reason_k_share``, ``reason_k_direction`` for k = 1..reason_count.

    Flagged rows carry them.
    """
    return tuple(
        field
        for k in range(1, reason_count + 1)
        for field in (
            (f"reason_{k}", pa.string()),
            (f"reason_{k}_share", pa.float64()),
            (f"reason_{k}_direction", pa.string()),
        )
    )


FLAGGED_COLUMNS = tuple(name for name, _ in FLAGGED_ADDED)
SCORES_COLUMNS = tuple(name for name, _ in SCORES_ADDED)
QUARANTINE_COLUMNS = tuple(name for name, _ in QUARANTINE_ADDED)
# An input column may not be named like any of these: the outputs would hold it twice.
RESERVED_COLUMNS = frozenset(
    FLAGGED_COLUMNS
    + SCORES_COLUMNS
    + QUARANTINE_COLUMNS
    + (PARTITION_COLUMN,)
    + tuple(name for name, _ in reason_fields(MAX_REASONS))
)


def output_metadata(model_version: str, threshold: float, percentile: float) -> dict[bytes, bytes]:
    """Return the Parquet key-value metadata every output file carries."""
    return {
        b"anomaly.model_version": model_version.encode(),
        b"anomaly.threshold": repr(float(threshold)).encode(),
        b"anomaly.percentile": repr(float(percentile)).encode(),
        b"anomaly.schema_version": SCHEMA_VERSION.encode(),
    }


def _with_added(
    fields: Sequence[pa.Field], added: Sequence[tuple[str, pa.DataType]], metadata: dict[bytes, bytes]
) -> pa.Schema:
    return pa.schema(list(fields) + [pa.field(name, type_) for name, type_ in added], metadata=metadata)


def flagged_schema(input_schema: pa.Schema, metadata: dict[bytes, bytes], reason_count: int = 0) -> pa.Schema:
    """Every input column, then the flagged-rows columns, then ``reason_count`` reasons."""
    return _with_added(list(input_schema), FLAGGED_ADDED + reason_fields(reason_count), metadata)


def scores_schema(input_schema: pa.Schema, id_columns: Sequence[str], metadata: dict[bytes, bytes]) -> pa.Schema:
    """The identifying input columns, then the score columns."""
    return _with_added([input_schema.field(c) for c in id_columns], SCORES_ADDED, metadata)


def quarantine_schema(input_schema: pa.Schema, metadata: dict[bytes, bytes]) -> pa.Schema:
    """Every input column, then why the row could not be scored."""
    return _with_added(list(input_schema), QUARANTINE_ADDED, metadata)
