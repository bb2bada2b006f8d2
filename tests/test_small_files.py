"""A night of many small files is scored in groups, with outputs equal, row for row, to scoring each file alone."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest

from data.batches import incoming_batches
from data.workspace import Workspace
from models.scoring.groups import group_work
from tests.conftest import RUN_DATE, make_rows, write_rows
from tests.test_dask import _record, _tables, _without

pytestmark = pytest.mark.slow

FILES, ROWS_PER_FILE, ROWS_PER_UNIT = 20, 600, 10_000


def _small_files(root) -> None:
    folder = Workspace.at(root).incoming_for(RUN_DATE)
    for i in range(FILES):
        table = make_rows(ROWS_PER_FILE, 200 + i, anomaly_share=0.02, start_id=i * 1_000)
        if i == 7:
            values = table.column("f1").to_numpy().copy()
            values[[3, 300]] = np.nan
            table = table.set_column(2, "f1", pa.array(values))
        write_rows(table, folder / f"part-{i:02d}.parquet")
    (folder / "part-05.parquet").write_bytes(b"not parquet: a file cut short by the exporter")


def test_small_files_scored_in_groups_equal_each_file_scored_alone(harness, workspace_copy, tmp_path):
    from flows.score import BatchesFailedError, score_flow

    _small_files(workspace_copy)
    alone = tmp_path / "alone"
    shutil.copytree(workspace_copy, alone)
    work = [(RUN_DATE, b) for b in incoming_batches(Workspace.at(workspace_copy), RUN_DATE)]
    groups = group_work(work, ROWS_PER_UNIT)
    # The unreadable file is a group of its own; the others share two groups.
    assert sorted(len(g.positions) for g in groups) == [1, 3, 16]

    with pytest.raises(BatchesFailedError) as grouped:
        score_flow(workspace=str(workspace_copy), run_date=RUN_DATE, rows_per_unit=ROWS_PER_UNIT)
    one_by_one = []
    for _, batch in work:
        path = str(Workspace.at(alone).incoming_for(RUN_DATE) / batch.path.name)
        try:
            one_by_one.append(score_flow(workspace=str(alone), run_date=RUN_DATE, batch_paths=[path]))
        except BatchesFailedError as failed:
            one_by_one.append(failed.outcome)

    outcome = grouped.value.outcome
    assert outcome["batches_scored"] == FILES - 1 and [f["batch"] for f in outcome["failed"]] == ["part-05"]
    # A run's figures are its date's, so the last run alone has every file's.
    assert outcome["rows_scored"] == one_by_one[-1]["rows_scored"] == (FILES - 1) * ROWS_PER_FILE - 2
    alone_failures = json.dumps([f for o in one_by_one for f in o["failed"]])
    assert alone_failures == json.dumps(outcome["failed"]).replace(str(workspace_copy), str(alone))
    for kind in ("flagged", "scores", "quarantine"):
        ours, theirs = _tables(workspace_copy, kind), _tables(alone, kind)
        assert ours.num_rows > 0, kind
        assert ours.schema.equals(theirs.schema) and ours.to_pandas().equals(theirs.to_pandas()), kind
    grouped_ws, alone_ws = Workspace.at(workspace_copy), Workspace.at(alone)
    for _, batch in work:
        if batch.name == "part-05":
            assert not (grouped_ws.state_dir / "scored" / f"date={RUN_DATE}" / "part-05.json").exists()
            continue
        reports = [
            json.loads((ws.output_partition("reports", RUN_DATE) / "batches" / f"{batch.name}.json").read_text())
            for ws in (grouped_ws, alone_ws)
        ]
        assert _without(reports[0], "source") == _without(reports[1], "source"), batch.name
        assert _record(grouped_ws, batch.name) == _record(alone_ws, batch.name), batch.name

    # Once the cut file is whole, a rerun scores it alone and skips the others.
    write_rows(make_rows(ROWS_PER_FILE, 205, start_id=5_000), grouped_ws.incoming_for(RUN_DATE) / "part-05.parquet")
    again = score_flow(workspace=str(workspace_copy), run_date=RUN_DATE, rows_per_unit=ROWS_PER_UNIT)
    assert (again["batches_scored"], again["batches_skipped"], again["batches_failed"]) == (1, FILES - 1, 0)
    assert again["rows_scored"] == FILES * ROWS_PER_FILE - 2
