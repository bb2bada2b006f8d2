"""Tasks that write evaluation reports and publish them as Prefect artifacts; both flows use them."""

from __future__ import annotations

import re
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from data import storage
from models.evaluation import reports
from tasks.common import RETRIES


def artifact_key(*parts: str) -> str:
    """Return a Prefect artifact key: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


@task(name="write-evaluation-report", cache_policy=NO_CACHE, **RETRIES)
def write_evaluation_report(
    summary: dict[str, Any], directory: str, stem: str, title: str, context: dict[str, Any]
) -> dict[str, str]:
    """Write an evaluation report (JSON, Markdown, PNG)."""
    return reports.write_evaluation_report(summary, storage.as_path(directory), stem, title, context)


@task(name="publish-report-artifacts", cache_policy=NO_CACHE)
def publish_report_artifacts(key: str, markdown: str, table: list[dict[str, Any]], description: str) -> None:
    """Publish a report as a Markdown artifact and a table artifact, so it shows in the Prefect UI."""
    create_markdown_artifact(key=artifact_key(key), markdown=markdown, description=description)
    if table:
        create_table_artifact(key=artifact_key(key, "table"), table=table, description=description)
