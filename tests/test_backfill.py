"""Backfill: a range of dates scored in order through the scoring flow, resumable, skipping what is done."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from data.workspace import Workspace
from tests.conftest import make_rows, write_rows

pytestmark = pytest.mark.slow

FIRST = dt.date(2026, 10, 1)
DATES = [FIRST + dt.timedelta(days=k) for k in range(4)]


def _nights(root) -> dict[dt.date, int]:
    """Two small files on each date but the third, which has no folder; return each date's rows."""
    ws = Workspace.at(root)
    rows = {}
    for k, day in enumerate(DATES):
        if k == 2:
            continue
        for part in range(2):
            table = make_rows(300, seed=100 + 10 * k + part, anomaly_share=0.02, start_id=10_000 * k + 1000 * part)
            write_rows(table, ws.incoming_for(day) / f"part-{part}.parquet")
        rows[day] = 600
    return rows


def test_a_backfill_scores_each_date_in_order_and_a_second_one_skips_them(harness, workspace_copy):
    from flows.backfill import backfill_flow

    ws = Workspace.at(workspace_copy)
    rows = _nights(workspace_copy)
    where = {"start_date": DATES[0], "end_date": DATES[-1], "workspace": str(workspace_copy)}
    line = backfill_flow(**where)
    assert [d["date"] for d in line["dates"]] == [d.isoformat() for d in DATES]
    assert [d["status"] for d in line["dates"]] == ["scored", "scored", "no_batches", "scored"]
    assert [d["rows_scored"] for d in line["dates"]] == [600, 600, None, 600]
    assert line["rows_scored"] == sum(rows.values()) and line["dates_no_batches"] == [DATES[2].isoformat()]
    for day in rows:
        report = json.loads((ws.output_partition("reports", day) / "run-report.json").read_text())
        assert report["rows_scored"] == 600

    again = backfill_flow(**where)
    assert [d["status"] for d in again["dates"]] == ["already_scored", "already_scored", "no_batches", "already_scored"]
    assert again["rows_scored"] == 0

    forced = backfill_flow(**where, force=True)
    assert forced["dates_scored"] == [d.isoformat() for d in rows] and forced["rows_scored"] == sum(rows.values())


def test_the_backfill_command_takes_the_range_and_ends_with_each_date_in_its_json_line(capsys):
    from flows.cli import main

    def fake_run(command, args):
        assert (command, args.start_date, args.end_date, args.force) == ("backfill", DATES[0], DATES[-1], True)
        return {"start_date": "2026-10-01", "dates": [{"date": "2026-10-01", "status": "scored"}], "unrelated": 1}

    argv = ["backfill", "--start-date", "2026-10-01", "--end-date", "2026-10-04", "--force"]
    assert main(argv, run=fake_run) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == {
        "command": "backfill",
        "status": "completed",
        "start_date": "2026-10-01",
        "dates": [{"date": "2026-10-01", "status": "scored"}],
    }
    with pytest.raises(SystemExit):
        main(["backfill", "--start-date", "2026-10-01"], run=fake_run)
    assert "--end-date" in capsys.readouterr().err


def test_a_killed_backfill_rerun_resumes_at_the_first_date_not_done(harness, workspace_copy, monkeypatch):
    import flows.backfill as backfill

    _nights(workspace_copy)
    real_score_flow = backfill.score_flow
    started = []

    def killed_on_the_second_date(**kwargs):
        started.append(kwargs["run_date"])
        if len(started) == 2:
            raise KeyboardInterrupt("the process was killed")
        return real_score_flow(**kwargs)

    monkeypatch.setattr(backfill, "score_flow", killed_on_the_second_date)
    with pytest.raises(KeyboardInterrupt):
        backfill.backfill_flow(start_date=DATES[0], end_date=DATES[-1], workspace=str(workspace_copy))
    monkeypatch.setattr(backfill, "score_flow", real_score_flow)

    outcome = backfill.backfill_flow(start_date=DATES[0], end_date=DATES[-1], workspace=str(workspace_copy))
    assert [d["status"] for d in outcome["dates"]] == ["already_scored", "scored", "no_batches", "scored"]
    assert started == [DATES[0], DATES[1]]


def test_a_date_with_a_bad_file_fails_the_backfill_after_every_other_date_is_scored(harness, workspace_copy):
    from flows.backfill import BackfillFailedError, backfill_flow

    _nights(workspace_copy)
    (Workspace.at(workspace_copy).incoming_for(DATES[1]) / "broken.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(BackfillFailedError, match=r"1 of 4 date\(s\) had batches that failed: \['2026-10-02'\]") as e:
        backfill_flow(start_date=DATES[0], end_date=DATES[-1], workspace=str(workspace_copy))
    dates = e.value.outcome["dates"]
    assert [d["status"] for d in dates] == ["scored", "failed", "no_batches", "scored"]
    assert dates[1]["batches_failed"] == 1 and dates[1]["batches_scored"] == 2


def test_a_range_that_ends_before_it_starts_is_refused_naming_the_parameters(harness, workspace_copy):
    from data.errors import ParameterError
    from flows.backfill import backfill_flow

    with pytest.raises(ParameterError, match="end_date=2026-10-01 must be start_date=2026-10-04 or later"):
        backfill_flow(start_date=DATES[-1], end_date=DATES[0], workspace=str(workspace_copy))
