"""Parquet input: finding files, checking their schema against the model's features, streaming reads."""

from __future__ import annotations

import glob
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data import storage
from data.errors import BatchFileError, SchemaError, TrainingDataError
from data.output_schema import RESERVED_COLUMNS

DEFAULT_CHUNK_ROWS = 131_072
# How a missing feature value (null or NaN) is handled: filled inside the model, so the row is trained on and
# scored, or (the older rule) refused in training and quarantined at night. Infinite values are bad input either way.
MissingValues = Literal["fill", "quarantine"]
FILL_MISSING: MissingValues = "fill"
# Training reads at most this many rows (a seeded sample above it): 2 M rows of 64 features are 1 GB as float64.
DEFAULT_MAX_TRAINING_ROWS = 2_000_000
# A text column becomes a categorical feature when its training rows hold at most this many distinct values.
DEFAULT_MAX_CATEGORIES = 50
# Why a text column with a distinct value on every row (an id, a timestamp as text) is never a category.
IDENTIFIER_COLUMN = "identifier: a distinct value on every row"

# Above this share of rows with missing or infinite features a batch fails instead of being scored.
DEFAULT_MAX_BAD_ROW_SHARE = 0.1


def resolve_parquet_files(source: str | os.PathLike[str]) -> list[Path]:
    """Return the .parquet files named by a file, a folder (searched recursively) or a glob, sorted.

    The location may be on a disk or in object storage.
    """
    path = storage.as_path(source)
    remote = storage.is_remote(path)
    if not remote:
        path = path.expanduser()
    if storage.is_dir(path):
        files = storage.list_files(path, "*.parquet", recursive=True)
    elif storage.is_file(path):
        files = [path]
    elif remote:
        files = sorted(
            (
                storage.as_path(f"{path.protocol}://{key}")
                for key in path.fs.glob(path.path)
                if key.endswith(".parquet")
            ),
            key=str,
        )
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if p.endswith(".parquet"))
    return [storage.absolute(p) for p in files]


STREAM_BUFFER_BYTES = 4 << 20


def read_error(path: Path, error: BaseException, what: str, code: str) -> BatchFileError:
    """Return the error to raise for a failed read: missing file, transient I/O error (retried) or bad content."""
    if isinstance(error, FileNotFoundError):
        return BatchFileError(path, "file not found", code="missing")
    if storage.is_transient(error):
        return BatchFileError(
            path, f"I/O error while reading ({error}); retried before giving up", code="read_error", transient=True
        )
    return BatchFileError(path, f"{what} ({error})", code=code)


def open_parquet(path: Path, streaming: bool = False) -> pq.ParquetFile:
    """Open a Parquet file, turning any low-level failure into an error that names the file."""
    source, filesystem = storage.arrow_source(path)
    try:
        if streaming:
            # Pre-buffering keeps every row group read so far in memory until the file is closed;
            # buffered column reads keep memory flat however large the file is.
            return pq.ParquetFile(source, pre_buffer=False, buffer_size=STREAM_BUFFER_BYTES, filesystem=filesystem)
        return pq.ParquetFile(source, filesystem=filesystem)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise read_error(path, exc, "not a readable Parquet file", "unreadable") from exc


def is_numeric_type(dtype: pa.DataType) -> bool:
    """Return True for integer, floating-point and boolean Arrow types, which cast to float64 losslessly enough."""
    return pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_boolean(dtype)


def is_text_type(dtype: pa.DataType) -> bool:
    """Return True for string columns, plain or dictionary-encoded (pandas' category): candidates for categories."""
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)


def feature_kind(dtype: pa.DataType, categorical: bool) -> str:
    """Return how a feature column is encoded: ``categorical``, ``boolean`` or ``numeric``."""
    return "categorical" if categorical else "boolean" if pa.types.is_boolean(dtype) else "numeric"


@dataclass(frozen=True)
class BatchSchema:
    """What a batch file holds, once checked against the model's features."""

    path: Path
    arrow_schema: pa.Schema
    columns: list[str]
    passthrough_columns: list[str]
    num_rows: int
    num_row_groups: int


def check_batch_schema(
    path: Path,
    feature_names: Sequence[str],
    reserved: frozenset[str] = RESERVED_COLUMNS,
    categorical: Collection[str] = (),
) -> BatchSchema:
    """Check that ``path`` is readable Parquet holding every feature with its kind's type and no ``reserved`` column.

    ``categorical`` features must be text columns; the others numeric (integers and booleans included).
    """
    parquet = open_parquet(path)
    schema = parquet.schema_arrow
    names = list(schema.names)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SchemaError(path, "column name appears more than once", column=duplicates[0], code="duplicate_column")
    clashes = sorted(set(names) & reserved)
    if clashes:
        raise SchemaError(
            path, "input already has a column the outputs add; rename it", column=clashes[0], code="reserved_column"
        )
    for feature in feature_names:
        if feature not in names:
            raise SchemaError(path, "feature column is missing", column=feature, code="missing_column")
        dtype = schema.field(feature).type
        if feature in categorical:
            if not is_text_type(dtype):
                raise SchemaError(
                    path,
                    f"categorical feature column has type {dtype}, expected text (string or dictionary)",
                    column=feature,
                    code="non_text_column",
                )
        elif not is_numeric_type(dtype):
            raise SchemaError(
                path, f"feature column has type {dtype}, expected a number", column=feature, code="non_numeric_column"
            )
    num_rows = parquet.metadata.num_rows
    if num_rows == 0:
        raise BatchFileError(path, "file has no rows", code="empty")
    features = set(feature_names)
    return BatchSchema(
        path=path,
        arrow_schema=schema,
        columns=names,
        passthrough_columns=[n for n in names if n not in features],
        num_rows=num_rows,
        num_row_groups=parquet.metadata.num_row_groups,
    )


def iter_record_batches(
    path: Path, chunk_rows: int = DEFAULT_CHUNK_ROWS, row_groups: Sequence[int] | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream ``path`` (or some of its row groups) as record batches of at most ``chunk_rows`` rows.

    Batches never span two row groups, so a row group is cut into the same chunks whether the file
    is read whole or one slice of row groups at a time. The next batch is read in a background
    thread while the caller works on the current one.
    """
    parquet = open_parquet(path, streaming=True)
    groups = list(range(parquet.metadata.num_row_groups)) if row_groups is None else list(row_groups)
    rows = sum(parquet.metadata.row_group(group).num_rows for group in groups)
    if len(groups) <= 1 and rows <= chunk_rows:
        # Read in one batch, a small file has nothing to overlap, and too few rows to decode in parallel:
        # threads would only add their start-up to each of many small files.
        return _record_batches(path, parquet, chunk_rows, groups, use_threads=False)
    return _read_ahead(_record_batches(path, parquet, chunk_rows, groups, use_threads=True))


_END = object()


def _read_ahead(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    # Decoding Parquet releases the GIL, so reading one batch ahead overlaps it with scoring at the
    # cost of one batch of memory.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet-read-ahead") as reader:
        pending = reader.submit(next, batches, _END)
        while (batch := pending.result()) is not _END:
            pending = reader.submit(next, batches, _END)
            yield batch


def _record_batches(
    path: Path, parquet: pq.ParquetFile, chunk_rows: int, groups: Sequence[int], use_threads: bool
) -> Iterator[pa.RecordBatch]:
    try:
        for group in groups:
            yield from parquet.iter_batches(batch_size=chunk_rows, row_groups=[group], use_threads=use_threads)
    except (pa.ArrowException, OSError) as exc:
        raise read_error(path, exc, "file is corrupt or truncated", "corrupt") from exc


_FILL_BLOCK_ROWS = 4096


def category_codes(column: pa.Array | pa.ChunkedArray, vocabulary: Sequence[str]) -> pa.Array:
    """Return each value's position in ``vocabulary`` as float64; ``len(vocabulary)`` if unseen, NaN if null."""
    if isinstance(column, pa.ChunkedArray):
        return pa.chunked_array([category_codes(chunk, vocabulary) for chunk in column.chunks], type=pa.float64())
    if pa.types.is_dictionary(column.type):
        # Each distinct value is looked up once, in the dictionary, and its code taken for every row.
        return pc.take(category_codes(column.dictionary, vocabulary), column.indices).fill_null(np.nan)
    codes = pc.index_in(column, value_set=pa.array(list(vocabulary), type=column.type))
    unseen = pc.and_(pc.is_null(codes), pc.is_valid(column))
    codes = pc.if_else(unseen, pa.scalar(len(vocabulary), codes.type), codes)
    return codes.cast(pa.float64()).fill_null(np.nan)


def feature_matrix(
    batch: pa.RecordBatch | pa.Table,
    feature_names: Sequence[str],
    dtype: type = np.float32,
    vocabularies: Mapping[str, Sequence[str]] | None = None,
) -> np.ndarray:
    """Return the features of ``batch`` as one C-ordered 2-D array; nulls become NaN.

    A categorical feature (one of ``vocabularies``) becomes its values' codes (see ``category_codes``).
    """
    vocabularies = vocabularies or {}
    columns = []
    for name in feature_names:
        column = batch.column(name)
        if name in vocabularies:
            column = category_codes(column, vocabularies[name])
        elif column.null_count:
            column = column.cast(pa.float64()).fill_null(np.nan)
        columns.append(column.to_numpy(zero_copy_only=False))
    matrix = np.empty((batch.num_rows, len(feature_names)), dtype=dtype)
    # Filled in blocks of rows small enough to stay in cache: writing whole strided columns is 4x slower.
    # A float64 beyond float32's range becomes infinite, which marks its row as one that cannot be scored.
    with np.errstate(over="ignore"):
        for start in range(0, batch.num_rows, _FILL_BLOCK_ROWS):
            block = matrix[start : start + _FILL_BLOCK_ROWS]
            for j, values in enumerate(columns):
                block[:, j] = values[start : start + _FILL_BLOCK_ROWS]
    return matrix


def plan_row_group_units(path: Path, rows_per_unit: int) -> list[list[int]]:
    """Split a file's row groups into consecutive units of about ``rows_per_unit`` rows (at least one group each)."""
    metadata = open_parquet(path).metadata
    units: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for group in range(metadata.num_row_groups):
        current.append(group)
        rows += metadata.row_group(group).num_rows
        if rows >= rows_per_unit:
            units.append(current)
            current, rows = [], 0
    if current or not units:
        units.append(current)
    return units


NORMAL, ANOMALY, UNLABELLED = 0, 1, -1


@dataclass(frozen=True)
class LabelRule:
    """Which training rows are normal: those whose ``column`` reads ``normal`` (compared as text), or every row."""

    column: str = "label"
    normal: str = "0"
    all_rows_normal: bool = False


def label_classes(labels: pa.Array | pa.ChunkedArray, normal_label: str) -> np.ndarray:
    """Return NORMAL where the label is ``normal_label``, UNLABELLED where it is null or NaN, else ANOMALY.

    Labels are compared with ``normal_label`` as text.
    """
    import pyarrow.compute as pc

    missing = pc.is_null(labels, nan_is_null=True).to_numpy(zero_copy_only=False)
    text = labels.cast(pa.string()).to_numpy(zero_copy_only=False)
    return np.where(missing, UNLABELLED, np.where(text == str(normal_label), NORMAL, ANOMALY)).astype(np.int8)


@dataclass(frozen=True)
class TrainingInput:
    """How training rows are read: what a missing value does, and how many rows are kept at most (a sample)."""

    missing_values: MissingValues = FILL_MISSING
    max_rows: int | None = None
    max_categories: int = DEFAULT_MAX_CATEGORIES


@dataclass
class TrainingRows:
    """Training rows read into memory: features, each row's label class, and where they came from."""

    features: np.ndarray
    classes: np.ndarray
    feature_names: list[str]
    files: list[Path]
    fingerprint: str
    # Every other column of the first file, with why it is not a feature.
    ignored_columns: dict[str, str]
    # How many values of each feature are missing (null or NaN), for the features that have any, among all rows read.
    missing_values: dict[str, int]
    # How many rows the files hold: more than ``features`` when a sample was taken.
    rows_read: int
    # Each categorical feature's values in code order (its code is the position; unseen values get the next).
    vocabularies: dict[str, list[str]] = field(default_factory=dict)
    # Each feature's kind: numeric, boolean or categorical.
    kinds: dict[str, str] = field(default_factory=dict)


def ignored_columns(
    schema: pa.Schema,
    feature_names: Sequence[str],
    label_column: str,
    id_columns: Sequence[str],
    text_columns: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Return each column of ``schema`` that is not a feature, with why: label, identifier, values, type or not chosen.

    ``text_columns`` gives why each text column that could have been categorical is not.
    """
    features = set(feature_names)
    text_columns = text_columns or {}
    why = {}
    for column in schema:
        if column.name in features:
            continue
        if column.name == label_column:
            why[column.name] = "label"
        elif column.name in id_columns:
            why[column.name] = "identifier"
        elif column.name in text_columns:
            why[column.name] = text_columns[column.name]
        elif not (is_numeric_type(column.type) or is_text_type(column.type)):
            why[column.name] = f"unsupported type {column.type}: only numeric, boolean and text columns are features"
        else:
            why[column.name] = "not among feature_columns"
    return why


@dataclass(frozen=True)
class TrainingFeatures:
    """The training files, their features in column order, each categorical feature's vocabulary, and why not others."""

    files: list[Path]
    names: list[str]
    vocabularies: dict[str, list[str]]
    # Text columns that are not categorical features, with why (identifier, too many distinct values).
    text_columns: dict[str, str]


def text_vocabularies(
    files: Sequence[Path], columns: Sequence[str], max_categories: int
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Return the sorted distinct values of each text column holding at most ``max_categories``, and why not the others.

    Only those columns are read, a chunk at a time; a column is given up as soon as it has too many values.
    """
    distinct: dict[str, set[str]] = {c: set() for c in columns}
    values = dict.fromkeys(columns, 0)
    refused: dict[str, str] = {}
    for path in files:
        parquet = open_parquet(path, streaming=True)
        for batch in parquet.iter_batches(batch_size=DEFAULT_CHUNK_ROWS, columns=list(columns)):
            for name in columns:
                if name in refused:
                    continue
                column = batch.column(name)
                if pa.types.is_dictionary(column.type):
                    column = column.cast(column.type.value_type)
                distinct[name].update(pc.unique(column.drop_null()).to_pylist())
                values[name] += len(column) - column.null_count
                if len(distinct[name]) > max_categories:
                    refused[name] = (
                        IDENTIFIER_COLUMN
                        if len(distinct[name]) == values[name]
                        else f"too many distinct values: more than max_categories={max_categories}"
                    )
    vocabularies = {}
    for name in columns:
        if name in refused:
            continue
        if not distinct[name]:
            refused[name] = "no values: null on every row"
        elif len(distinct[name]) == values[name] and values[name] > 1:
            refused[name] = IDENTIFIER_COLUMN
        else:
            vocabularies[name] = sorted(distinct[name])
    return vocabularies, refused


def feature_candidates(schema: pa.Schema, label_column: str, exclude_columns: Sequence[str] = ("row_id",)) -> list[str]:
    """Return the columns of ``schema`` that may be features: numeric and text ones, label and ids left out."""
    skip = {label_column, *exclude_columns}
    return [f.name for f in schema if (is_numeric_type(f.type) or is_text_type(f.type)) and f.name not in skip]


def training_features(
    source: str | os.PathLike[str],
    label_column: str,
    feature_columns: Sequence[str] | None = None,
    exclude_columns: Sequence[str] = ("row_id",),
    max_categories: int = DEFAULT_MAX_CATEGORIES,
) -> TrainingFeatures:
    """Return the training Parquet files of a file, folder or glob, and their features.

    The features are those given, or else every numeric non-label column of the first file and every
    text column with at most ``max_categories`` distinct values in the training rows.
    """
    files = resolve_parquet_files(source)
    if not files:
        raise TrainingDataError(f"training_data={str(source)!r}: no .parquet files found there")
    schema = open_parquet(files[0]).schema_arrow
    names = list(feature_columns) if feature_columns else feature_candidates(schema, label_column, exclude_columns)
    text = [n for n in names if n in schema.names and is_text_type(schema.field(n).type)]
    vocabularies, refused = text_vocabularies(files, text, max_categories) if text else ({}, {})
    if feature_columns and refused:
        column, why = next(iter(refused.items()))
        raise TrainingDataError(
            f"{files[0]}, column '{column}': cannot be a categorical feature ({why}); "
            "leave it out of feature_columns or raise max_categories"
        )
    names = [n for n in names if n not in refused]
    if not names:
        raise TrainingDataError(f"{files[0]}: no numeric or categorical feature columns found")
    reserved = sorted(set(names) & RESERVED_COLUMNS)
    if reserved:
        raise TrainingDataError(
            f"{files[0]}, column '{reserved[0]}': a feature may not be named like a column the outputs add; rename it"
        )
    return TrainingFeatures(files, names, vocabularies, refused)


def read_training_rows(
    source: str | os.PathLike[str],
    label_column: str,
    normal_label: str,
    all_rows_normal: bool = False,
    feature_columns: Sequence[str] | None = None,
    exclude_columns: Sequence[str] = ("row_id",),
    missing_values: MissingValues = FILL_MISSING,
    max_rows: int | None = None,
    seed: int = 0,
    max_categories: int = DEFAULT_MAX_CATEGORIES,
    vocabularies: Mapping[str, Sequence[str]] | None = None,
) -> TrainingRows:
    """Read labelled training Parquet from a file, folder or glob; features default to all numeric non-label columns.

    Text columns with at most ``max_categories`` distinct values are categorical features, read as codes
    of their vocabulary (``vocabularies``, when given, fixes it: rows read to join earlier ones). Missing
    values stay NaN for the model to fill, unless ``missing_values`` is ``quarantine``, which refuses them.
    With ``max_rows``, a seeded uniform sample of that many rows is kept from all files (every row if fewer).
    """
    if vocabularies is not None:
        fixed = {name: list(values) for name, values in vocabularies.items()}
        found = TrainingFeatures(resolve_parquet_files(source), list(feature_columns or []), fixed, {})
    else:
        found = training_features(source, label_column, feature_columns, exclude_columns, max_categories)
    files, names, vocabulary = found.files, found.names, found.vocabularies
    if not files:
        raise TrainingDataError(f"training_data={str(source)!r}: no .parquet files found there")
    sample = RowSample(max_rows, seed)
    missing = np.zeros(len(names), dtype=np.int64)
    for path in files:
        schema = check_batch_schema(path, names, reserved=frozenset(), categorical=vocabulary)
        has_label = label_column in schema.columns
        if not has_label and not all_rows_normal:
            raise TrainingDataError(
                f"{path}: label column '{label_column}' is missing; name the right column with label_column, "
                "or set all_rows_normal if every row is normal"
            )
        columns = names + ([label_column] if has_label else [])
        # A chunk at a time, so that a sample of a set larger than memory holds only the sample and one chunk.
        for table in open_parquet(path, streaming=True).iter_batches(batch_size=DEFAULT_CHUNK_ROWS, columns=columns):
            matrix = feature_matrix(table, names, dtype=np.float64, vocabularies=vocabulary)
            bad = np.isinf(matrix) if missing_values == FILL_MISSING else ~np.isfinite(matrix)
            if bad.any():
                column = names[int(np.argmax(bad.any(axis=0)))]
                what = "infinite values" if missing_values == FILL_MISSING else "NaN, null or infinite values"
                hint = "" if missing_values == FILL_MISSING else " (missing_values='fill' trains on rows with gaps)"
                whole = table.num_rows == schema.num_rows
                rows = f"{int(bad.any(axis=1).sum())} rows" + ("" if whole else f" of {table.num_rows:,} read")
                raise TrainingDataError(f"{path}, column '{column}': {rows} hold {what}{hint}")
            missing += np.isnan(matrix).sum(axis=0)
            classes = (
                label_classes(table.column(label_column), normal_label)
                if has_label
                else np.full(len(matrix), NORMAL, dtype=np.int8)
            )
            sample.add(matrix, classes)
    features, classes = sample.rows()
    first_schema = open_parquet(files[0]).schema_arrow
    return TrainingRows(
        features=features,
        classes=classes,
        feature_names=names,
        files=files,
        fingerprint=storage.files_digest(files),
        ignored_columns=ignored_columns(first_schema, names, label_column, exclude_columns, found.text_columns),
        missing_values={name: int(n) for name, n in zip(names, missing, strict=True) if n},
        rows_read=sample.seen,
        vocabularies=vocabulary,
        kinds={n: feature_kind(first_schema.field(n).type, n in vocabulary) for n in names if n in first_schema.names},
    )


class RowSample:
    """A seeded uniform sample of at most ``limit`` rows of a stream of blocks, in stream order; every row if None.

    Each row draws a random key and the rows with the smallest keys are kept (a bottom-k sample), so memory
    holds the sample and one block, whatever the stream's length.
    """

    def __init__(self, limit: int | None, seed: int):
        self.limit, self.rng, self.seen = limit, np.random.default_rng(seed), 0
        self.blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, features: np.ndarray, classes: np.ndarray) -> None:
        """Offer one block of rows to the sample."""
        self.seen += len(features)
        self.blocks.append((features, classes, self.rng.random(len(features))))
        if self.limit is not None and sum(len(b[0]) for b in self.blocks) > 2 * self.limit:
            self.blocks = [self._kept()]

    def _kept(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        features, classes, keys = (np.concatenate(part) for part in zip(*self.blocks, strict=True))
        if self.limit is not None and len(keys) > self.limit:
            # Sorted positions keep the rows in the order they were read.
            keep = np.sort(np.argpartition(keys, self.limit)[: self.limit])
            features, classes, keys = features[keep], classes[keep], keys[keep]
        return features, classes, keys

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the sampled features and label classes, in the order they were read."""
        features, classes, _ = self._kept()
        return features, classes


def read_table(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a whole Parquet file (or the named columns) from a disk or object storage."""
    source, filesystem = storage.arrow_source(path)
    return pq.read_table(source, columns=columns, filesystem=filesystem)


class _NamedParquetWriter(pq.ParquetWriter):
    """A ParquetWriter whose OS errors (a full disk) name the file being written, as pyarrow's do not."""

    def __init__(self, path: Path, schema: pa.Schema, target: Path, **options: object):
        self._target, self._path = target, path
        with storage.naming_write_errors(target, path):
            super().__init__(path, schema, **options)

    def write_table(self, table: pa.Table, row_group_size: int | None = None) -> None:
        with storage.naming_write_errors(self._target, self._path):
            super().write_table(table, row_group_size)

    def close(self) -> None:
        with storage.naming_write_errors(self._target, self._path):
            super().close()


def parquet_writer(path: Path, schema: pa.Schema, target: Path | None = None) -> pq.ParquetWriter:
    """Open a Parquet writer on ``path`` (the temporary of ``target``) that dictionary-encodes only text columns."""
    # On unique floats and ids pyarrow builds a dictionary and then gives it up, which makes writing
    # scores 4x slower and the file larger.
    text = [
        f.name
        for f in schema
        if pa.types.is_string(f.type) or pa.types.is_large_string(f.type) or pa.types.is_dictionary(f.type)
    ]
    return _NamedParquetWriter(path, schema, target or path, use_dictionary=text)


def concatenate_parquet(parts: Sequence[Path], target: Path) -> None:
    """Copy the row groups of ``parts``, in order, into one new file at ``target``, streaming."""
    schema = open_parquet(parts[0]).schema_arrow
    with parquet_writer(target, schema) as writer:
        for part in parts:
            for batch in open_parquet(part, streaming=True).iter_batches(batch_size=DEFAULT_CHUNK_ROWS):
                writer.write_batch(batch)


def read_holdout_errors(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Return the reconstruction errors of the rows that fix the threshold, and which of them are labelled anomalies."""
    table = pq.read_table(path)
    return (
        table.column("reconstruction_error").to_numpy(),
        table.column("labelled_anomaly").to_numpy(zero_copy_only=False),
    )
