"""What an analyst sees, checked in headless Chromium: lineage from source tables to the four views, and a
view's page with its description, columns, row count, `unique_index` check and freshness.

The webserver and daemon run on a migrated, seeded database whose views were refreshed through Dagster;
the weekly view's refresh is recorded 9 days in the past, so the daemon finds it late and the daily views
fresh. Screenshots land in test-artifacts/browser/ (gitignored; CI keeps them as artifacts).
"""

import json
import os
import shutil
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.test_utils import freeze_time

from analytics_views.operations.commands import refresh
from analytics_views.orchestration.component import load_definitions
from analytics_views.paths import PROJECT_ROOT
from analytics_views.operations.services import dagster_services
from analytics_views.sql_files.views import load_views, source_tables
from analytics_views_tests.conftest import free_port

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed: ./bootstrap installs the browser extra"
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason="no Chromium installed (/usr/bin/chromium): `apt-get install chromium`; .ci/run installs it",
)
# Headless, and nothing that reaches outside this machine.
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
SCREENSHOTS = PROJECT_ROOT / "test-artifacts" / "browser"
VIEWS = [view.name for view in load_views()]
SOURCES = list(source_tables(load_views()))
LATE_VIEW = "weekly_aggregations"

FRESHNESS_QUERY = """
query {
  assetNodes { assetKey { path } freshnessStatusInfo { freshnessStatus } }
}
"""


def graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["data"]


def wait_for_freshness(port: int, expected: dict[str, str], timeout_s: float = 120) -> None:
    """Until the daemon has evaluated every view's freshness policy as expected."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = graphql(port, FRESHNESS_QUERY)["assetNodes"]
        seen = {
            node["assetKey"]["path"][-1]: (node["freshnessStatusInfo"] or {}).get("freshnessStatus") for node in nodes
        }
        if all(seen.get(view) == status for view, status in expected.items()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"freshness after {timeout_s:.0f} s: {seen}, expected {expected}")
        time.sleep(1)


@pytest.fixture
def refreshed_deployment(dagster_env, tmp_path):
    """Webserver and daemon over views refreshed now (daily) and 9 days ago (weekly)."""
    daily = [view for view in VIEWS if view != LATE_VIEW]
    assert all(report.ok for report in refresh(dagster_env["DATABASE_URL"], daily))
    nine_days_ago = datetime.now(timezone.utc) - timedelta(days=9)
    # The refresh, and everything Dagster records of it, is dated then: in this process, whose clock is frozen
    # (the CLI's runs execute in a run worker of their own).
    job = load_definitions().resolve_job_def("weekly_refresh_job")
    with freeze_time(nine_days_ago), dg.DagsterInstance.get() as instance:
        assert job.execute_in_process(instance=instance).success
    env = {**dagster_env, "FRESHNESS_DAEMON_INTERVAL_SECONDS": "2"}  # the daemon's default is 30 s
    port = free_port()
    with dagster_services(env=env, port=port, log_dir=tmp_path / "logs"):
        wait_for_freshness(port, {view: "DEGRADED" if view == LATE_VIEW else "HEALTHY" for view in VIEWS})
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def page():
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1400})
            # The "join the community" dialog asks once per browser; an analyst who dismissed it sees the page.
            page.add_init_script("window.localStorage.setItem('communityNux', 'true')")
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def screenshot(page, name: str) -> Path:
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


SOURCES_GROUP_NAME = "sources"


def show_whole_graph(page, assets: list[str]) -> None:
    """Expand every group (the UI's Alt+E) and zoom out until each asset's node is drawn: the graph draws
    only the nodes inside the viewport."""
    page.get_by_text(SOURCES_GROUP_NAME, exact=True).first.wait_for()  # the sidebar's group list: loaded
    expanded = page.get_by_text(VIEWS[0], exact=True)
    for _ in range(5):  # the graph may open with its groups folded or unfolded, and may still be drawing
        try:
            expanded.first.wait_for(timeout=3000)
            break
        except sync_api.TimeoutError:
            page.mouse.move(1100, page.viewport_size["height"] // 2 + 50)
            page.keyboard.press("Alt+KeyE")  # unfold every group
    expanded.first.wait_for()
    page.mouse.move(1100, page.viewport_size["height"] // 2 + 50)
    height = page.viewport_size["height"]
    for _ in range(15):
        names = [page.get_by_text(asset, exact=True) for asset in assets]
        boxes = [name.first.bounding_box() if name.count() else None for name in names]
        if all(box and 110 < box["y"] and box["y"] + 150 < height for box in boxes):  # below the toolbar
            return
        page.keyboard.down("Control")
        page.mouse.wheel(0, 60)
        page.keyboard.up("Control")
        page.wait_for_timeout(500)
    drawn = [asset for asset in assets if page.get_by_text(asset, exact=True).count()]
    raise AssertionError(f"the lineage graph draws only {drawn} of {assets}")


def test_analyst_sees_lineage_description_row_count_check_and_freshness(refreshed_deployment, page):
    # The UI loads each panel on its own after the page; on a loaded machine one may miss a wait. A second
    # walk through the same pages tells a slow page from a wrong one, which fails both times.
    try:
        walk_the_analyst_pages(refreshed_deployment, page)
    except (sync_api.TimeoutError, AssertionError) as first:
        screenshot(page, "00-first-attempt-failed")
        print(f"first attempt failed, walking the pages again: {str(first).splitlines()[0]}")
        walk_the_analyst_pages(refreshed_deployment, page)


def walk_the_analyst_pages(base: str, page) -> None:
    page.goto(f"{base}/asset-groups")
    show_whole_graph(page, [*SOURCES, *VIEWS])
    page.wait_for_timeout(1000)  # let the last zoom step settle before the picture
    screenshot(page, "01-lineage-sources-to-views")

    page.goto(f"{base}/assets/daily_aggregations")
    page.get_by_text("How many users were active, signed up and paid on each UTC day").first.wait_for()
    page.get_by_text("Distinct users with at least one event that day.").first.wait_for()  # a column comment
    page.get_by_text("Fails if more than 26 hours since last materialization").first.wait_for()
    page.get_by_text("Passing", exact=True).first.wait_for()  # the freshness panel loads after the page
    overview = page.inner_text("body")
    for shown in (
        "Freshness policy\nPassing",
        "Row count\n90",
        "numeric(14,2)",  # revenue's type, as PostgreSQL reports it
        "Owners\nanalytics",  # team:analytics
        "cadence: daily",
        "sql/views/daily_aggregations.sql",  # "Open ... in editor"
        "payments.amount",  # column lineage: revenue and arpdau are computed from payments.amount
    ):
        assert shown in overview, shown
    screenshot(page, "02-daily-aggregations-overview")
    page.get_by_text("computed from").first.scroll_into_view_if_needed()
    screenshot(page, "02b-daily-aggregations-column-lineage")
    page.get_by_text("Plots", exact=True).first.click()
    page.get_by_text("Plots", exact=True).first.scroll_into_view_if_needed()
    page.wait_for_timeout(1500)
    screenshot(page, "03-daily-aggregations-metadata-plots")

    page.goto(f"{base}/assets/daily_aggregations?view=events")
    page.get_by_text("dagster/row_count").first.wait_for()
    assert "90" in page.inner_text("body")
    screenshot(page, "04-daily-aggregations-row-count-event")

    page.goto(f"{base}/assets/daily_aggregations?view=checks")
    # Every check of the view is listed; the first is shown until another is picked.
    for check in ("unique_index", "timezone_independent", "unique_key_not_null", "no_join_fanout", "revenue_matches_payments"):
        page.get_by_text(check, exact=True).first.wait_for()
    page.get_by_text("unique_index", exact=True).first.click()
    page.get_by_text("usable unique index: daily_aggregations_key").first.wait_for()
    assert "Passed" in page.inner_text("body")
    screenshot(page, "05-daily-aggregations-unique-index-check")

    page.goto(f"{base}/assets/{LATE_VIEW}")
    page.get_by_text("9 days ago").first.wait_for()  # its latest materialization
    # The freshness panel loads after the page: wait for its policy line before reading the page.
    page.get_by_text("Fails if more than 7 days since last materialization").first.wait_for()  # 7 d 2 h, humanized
    page.get_by_text("Failed", exact=True).first.wait_for()
    late = page.inner_text("body")
    assert "Freshness policy\nFailed" in late, "the weekly view refreshed 9 days ago is not shown as late"
    assert "Row count\n52" in late
    screenshot(page, "06-weekly-aggregations-late")
