"""The Prefect UI in a real headless browser: the nightly-scoring deployment and its Custom run form.

Needs Debian's chromium at /usr/bin/chromium (`make browser` installs it and runs this file).
Without it the module is skipped, except under CI (the CI variable set), where that is a failure.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import time
from pathlib import Path

import pytest

from tests.stack_fixtures import REPO, prefect_stack_fixture  # noqa: F401  (provides the prefect_stack fixture)

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO / "test-artifacts"
SCORING = "score-batches/nightly-scoring"
# The server sends "/" to the V2 UI; V1 still answers under the bare paths.
V2, V1 = "/v2", ""

if not CHROMIUM.exists() and not os.environ.get("CI"):
    pytest.skip(f"{CHROMIUM} is missing: run `make browser` to install it and run this check", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing under CI: .ci/run installs Debian's chromium before the tests")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.fail(f"the playwright package is missing ({exc}): run make install")
    ARTIFACTS.mkdir(exist_ok=True)
    print(f"\nscreenshots go to {ARTIFACTS}")
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1500})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


@pytest.fixture(scope="module")
def scoring(prefect_stack):
    with prefect_stack.client() as client:
        return client.read_deployment_by_name(SCORING)


def _labels(page) -> set[str]:
    return {text.replace("(Optional)", "").strip() for text in page.locator("label").all_inner_texts()}


def _property(page, ui: str, title: str) -> str:
    """Return the text of one parameter's block in the Custom run form: label, description and field."""
    block = page.locator("div.group" if ui == V2 else "div.schema-form-property").filter(
        has=page.locator("label", has_text=title)
    )
    return block.last.inner_text()


def _screenshot(page, name: str) -> Path:
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def test_the_deployment_page_shows_the_deployment_and_its_settings(prefect_stack, scoring, page):
    from playwright.sync_api import expect

    page.goto(f"{prefect_stack.ui_url}{V2}/deployments/deployment/{scoring.id}")
    # Parts of the page load separately; expect() waits for each.
    for text in (
        "nightly-scoring",
        "score-batches",
        "anomaly-process-pool",
        "flows/score.py:score_flow",
        "Concurrency Limit",
    ):
        expect(page.get_by_text(text, exact=True).first).to_be_visible()
    assert _screenshot(page, "ui-deployment-nightly-scoring.png").stat().st_size > 10_000


@pytest.mark.parametrize("ui", [V2, V1], ids=["v2", "v1"])
def test_the_custom_run_form_shows_every_parameter_titled_described_with_its_default(prefect_stack, scoring, page, ui):
    properties = scoring.parameter_openapi_schema["properties"]
    page.goto(f"{prefect_stack.ui_url}{ui}/deployments/deployment/{scoring.id}/run")
    page.get_by_text(properties["max_bad_row_share"]["title"]).first.wait_for()
    labels = _labels(page)
    for name in ("Run date", "Batch paths", "Force re-scoring", "Workspace"):
        assert name in labels, (name, labels)
    assert {p["title"] for p in properties.values()} <= labels
    body = " ".join(page.inner_text("body").split())
    # V1 renders descriptions as HTML, so compare the text before any <...>; a docstring's wrapped
    # description renders as one paragraph, so whitespace is compared collapsed.
    assert all(" ".join(p["description"].split("<")[0].split()) in body for p in properties.values())
    # The fields hold the deployment's defaults (V1 does not tie its labels to the inputs).
    values = page.locator("input, textarea").evaluate_all("fields => fields.map(f => f.value)")
    assert {
        scoring.parameters["workspace"],
        scoring.parameters["timezone"],
        str(properties["chunk_rows"]["default"]),
    } <= set(values), values
    # The run date is a plain, empty date picker: no `date | None` type toggle, no "Property is type None".
    run_date = _property(page, ui, "Run date")
    assert ("Pick a date" if ui == V2 else "Select date") in run_date
    assert "Property is type" not in run_date and "None" not in run_date, run_date
    assert _screenshot(page, f"ui-custom-run-nightly-scoring-{ui.strip('/') or 'v1'}.png").stat().st_size > 10_000


def test_the_form_refuses_an_out_of_range_value_and_creates_no_run(prefect_stack, scoring, page):
    before = prefect_stack.flow_run_ids(SCORING)
    form = f"{prefect_stack.ui_url}{V2}/deployments/deployment/{scoring.id}/run"
    page.goto(form)
    chunk_rows = page.get_by_label("Rows per chunk")
    chunk_rows.fill("10")
    page.get_by_role("button", name="Submit").click()
    time.sleep(2)
    assert page.url == form
    assert chunk_rows.evaluate("e => e.validity.valid") is False
    assert "1024" in chunk_rows.evaluate("e => e.validationMessage")
    _screenshot(page, "ui-custom-run-refused.png")
    assert prefect_stack.flow_run_ids(SCORING) == before


@pytest.mark.parametrize("pick_date", [False, True], ids=["date-left-empty", "date-picked"])
def test_a_custom_run_from_the_form_runs_on_the_worker_with_the_values_typed(
    prefect_stack, scoring, page, tmp_path, pick_date
):
    from playwright.sync_api import expect

    empty_workspace = tmp_path / "no-model-yet"
    before = prefect_stack.flow_run_ids(SCORING)
    # The UI reports a refused submission only in the browser's console.
    console: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    page.goto(f"{prefect_stack.ui_url}{V2}/deployments/deployment/{scoring.id}/run")
    # As a user would, type only once the form shows the deployment's values: it is then fully built.
    expect(page.get_by_label("Workspace")).to_have_value(scoring.parameters["workspace"])
    page.get_by_label("Workspace").fill(str(empty_workspace))
    page.get_by_label("Force re-scoring").click()
    if pick_date:
        # The picker opens on the browser's current month; its first day is the one picked.
        first_of_month = dt.date.today().replace(day=1)
        page.get_by_label("Run date").click()
        page.get_by_role("dialog").get_by_role("button", name=re.compile(r"\b1(st)?\b")).first.click()
        expect(page.get_by_label("Run date")).not_to_have_text("Pick a date")
    page.get_by_role("button", name="Submit").click()

    deadline = time.monotonic() + 30
    while not (new := prefect_stack.flow_run_ids(SCORING) - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not new:
        _screenshot(page, f"ui-custom-run-not-created-{'date-picked' if pick_date else 'date-left-empty'}.png")
        pytest.fail(
            "\n".join(
                [
                    f"submitting the form created no flow run; the browser is at {page.url}",
                    "--- console ---",
                    *console,
                    "--- server log ---",
                    prefect_stack.log("server", 60),
                ]
            )
        )
    assert len(new) == 1, "submitting the form created one flow run"
    [run] = prefect_stack.wait_until_final(*new)
    assert run.parameters["workspace"] == str(empty_workspace) and run.parameters["force"] is True
    # A picked date arrives as the ISO date the flow expects; an empty field sends "", which the flow reads as today.
    assert run.parameters.get("run_date") == (first_of_month.isoformat() if pick_date else ""), run.parameters
    assert run.name == f"score-{first_of_month.isoformat() if pick_date else 'today'}"
    # The workspace has no model: the run fails at once and says which file it looked for.
    assert run.state.is_failed() and f"{empty_workspace}/models/current.json" in run.state.message
