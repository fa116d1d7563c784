"""Any view on any cadence (the component's defs.yaml), and discovered views with rough edges, on another team's schema.

The product database (fixtures/product_schema.sql) refreshed its daily views every 4 hours; here that cadence
is configured, in a zone with DST, and views of it, ours and theirs, are put on other cadences by pattern.
"""

import os
import re
import subprocess
import sys
import textwrap
import uuid
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from analytics_views.operations import cli
from analytics_views.orchestration.view_checks import UNIQUE_INDEX_CHECK
from analytics_views.orchestration.cadences import freshness_window, longest_interval
from analytics_views.orchestration.component import DEFS_ENV, discover_views, load_definitions
from analytics_views.paths import SQL_DIR
from analytics_views.sql_files.discovery import key_part
from analytics_views.errors import AnalyticsViewsError
from analytics_views.sql_files.managed import Cadence, ManagedConfig
from analytics_views.sql_files.views import on_cadences, parse_view_file

PRODUCT_CONFIG = """
schemas: [product]
cadences:
  every_4_hours: {cron: "0 */4 * * *", timezone: America/Los_Angeles}
cadence:
  "product.daily_activity": every_4_hours
  "weekly_*": weekly
"""


def write_defs_yaml(path: Path, attributes: str) -> Path:
    """A defs.yaml configuring a MaterializedViewsComponent with these attributes (YAML)."""
    path.write_text(
        "type: analytics_views.MaterializedViewsComponent\nattributes:\n"
        + textwrap.indent(textwrap.dedent(attributes).strip() + "\n", "  ")
    )
    return path


def use_config(tmp_path: Path, monkeypatch, attributes: str) -> Path:
    """Definitions, runs and the CLI load this defs.yaml instead of the project's (ANALYTICS_VIEWS_DEFS)."""
    config = write_defs_yaml(tmp_path / "defs.yaml", attributes)
    monkeypatch.setenv(DEFS_ENV, str(config))
    return config


def execute(url: str, statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statements)


def job_views(defs: dg.Definitions, job: str) -> set[str]:
    return {key.to_user_string() for key in defs.resolve_job_def(job).asset_layer.executable_asset_keys}


def specs_by_key(defs: dg.Definitions) -> dict[str, dg.AssetSpec]:
    return {spec.key.to_user_string(): spec for spec in defs.resolve_all_asset_specs()}


def view_keys(defs: dg.Definitions) -> set[str]:
    return {key for key, spec in specs_by_key(defs).items() if spec.group_name == "analytics_views"}


@pytest.fixture
def product(product_db, tmp_path, monkeypatch) -> str:
    """The product database discovered with PRODUCT_CONFIG, DATABASE_URL set."""
    use_config(tmp_path, monkeypatch, PRODUCT_CONFIG)
    monkeypatch.setenv("DATABASE_URL", product_db)
    discover_views()
    return product_db


# --- any cadence -------------------------------------------------------------------------------------------


def test_a_discovered_view_on_an_every_4_hours_cadence_gets_its_job_schedule_zone_and_window(product):
    defs = load_definitions()

    schedules = {schedule.name: schedule for schedule in defs.schedules}
    assert set(schedules) == {"daily_refresh_schedule", "weekly_refresh_schedule", "every_4_hours_refresh_schedule"}
    every_4_hours = schedules["every_4_hours_refresh_schedule"]
    assert (every_4_hours.cron_schedule, every_4_hours.execution_timezone, every_4_hours.job_name) == (
        "0 */4 * * *",
        "America/Los_Angeles",
        "every_4_hours_refresh_job",
    )
    assert every_4_hours.default_status == dg.DefaultScheduleStatus.RUNNING
    assert job_views(defs, "every_4_hours_refresh_job") == {"product/daily_activity"}
    assert job_views(defs, "weekly_refresh_job") == {"product/weekly_purchases"}
    assert job_views(defs, "daily_refresh_job") == {
        "product/campaign_stats",
        "product/cohort_stats",
        "product/recent_activity",
        "product/refund_totals",
    }
    specs = specs_by_key(defs)
    # 4 hours, 5 across the fall-back in Los Angeles, plus 2 hours of slack.
    assert specs["product/daily_activity"].freshness_policy.fail_window.to_timedelta() == timedelta(hours=7)
    assert specs["product/daily_activity"].tags["cadence"] == "every_4_hours"
    assert specs["product/weekly_purchases"].freshness_policy.fail_window.to_timedelta() == timedelta(days=7, hours=2)

    result = defs.resolve_job_def("every_4_hours_refresh_job").execute_in_process(raise_on_error=False)

    assert result.success
    [materialization] = [
        event.materialization
        for event in result.get_asset_materialization_events()
        if event.asset_key == dg.AssetKey(["product", "daily_activity"])
    ]
    with psycopg.connect(product) as conn:
        rows = conn.execute("SELECT count(*) FROM product.daily_activity").fetchone()[0]
    assert rows > 0 and materialization.metadata["dagster/row_count"].value == rows


def test_cli_refreshes_a_cadence_by_name_and_names_the_cadences_it_knows(product, tmp_path, dagster_instance, capsys):
    assert cli.main(["refresh", "--cadence", "every_4_hours"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["product.daily_activity"]
    assert "refreshed (" in lines[0]

    assert cli.main(["refresh", "--cadence", "hourly"]) == 1
    assert capsys.readouterr().err == (
        "analytics-views refresh: error: unknown cadence 'hourly': "
        f"choose from daily, weekly, every_4_hours (or define it under attributes.cadences in {tmp_path / 'defs.yaml'})\n"
    )


def test_our_view_moves_to_another_cadence_by_pattern_over_its_header(tmp_path, monkeypatch):
    use_config(
        tmp_path,
        monkeypatch,
        f'sql_folder: {SQL_DIR}\ncadences: {{hourly: "0 * * * *"}}\n'
        'cadence: {"daily_agg*": hourly, "weekly_aggregations": daily}',
    )
    defs = load_definitions()

    assert job_views(defs, "hourly_refresh_job") == {"daily_aggregations"}
    assert job_views(defs, "daily_refresh_job") == {"cohort_aggregations", "campaign_aggregations", "weekly_aggregations"}
    # A cadence left without views gets no job and no schedule.
    assert "weekly_refresh_schedule" not in {schedule.name for schedule in defs.schedules}
    assert "weekly_refresh_job" not in {job.name for job in defs.jobs}
    specs = specs_by_key(defs)
    assert specs["daily_aggregations"].tags["cadence"] == "hourly"
    assert "Cadence: hourly (defs.yaml cadence; the header says daily)" in specs["daily_aggregations"].description
    assert specs["daily_aggregations"].freshness_policy.fail_window.to_timedelta() == timedelta(minutes=90)
    assert specs["weekly_aggregations"].freshness_policy.fail_window.to_timedelta() == timedelta(hours=26)


@pytest.mark.parametrize(
    ("cron", "timezone", "longest", "window"),
    [
        ("0 3 * * *", "UTC", timedelta(days=1), timedelta(hours=26)),
        ("0 4 * * 1", "UTC", timedelta(days=7), timedelta(days=7, hours=2)),
        ("0 */4 * * *", "UTC", timedelta(hours=4), timedelta(hours=6)),
        ("0 3 * * *", "Europe/Berlin", timedelta(hours=25), timedelta(hours=27)),  # the fall-back day
        ("0 9-17 * * 1-5", "America/New_York", timedelta(hours=65), timedelta(hours=67)),  # Friday 17:00 to Monday 9:00
        ("*/15 * * * *", "UTC", timedelta(minutes=15), timedelta(minutes=22, seconds=30)),  # slack: half the period
        ("0 0 1 * *", "UTC", timedelta(days=31), timedelta(days=31, hours=2)),
        ("0 0 1 1 *", "UTC", timedelta(days=366), timedelta(days=366, hours=2)),  # across a leap year
        ("0 0 29 2 *", "UTC", timedelta(days=4 * 365 + 1), timedelta(days=4 * 365 + 1, hours=2)),
        ("@daily", "UTC", timedelta(days=1), timedelta(hours=26)),
    ],
)
def test_the_freshness_window_is_the_longest_interval_between_ticks_plus_slack(cron, timezone, longest, window):
    cadence = Cadence("c", cron, timezone, where="defs.yaml: attributes.cadences.c")
    assert longest_interval(cadence) == longest
    assert freshness_window(cadence) == window


@pytest.mark.parametrize(
    ("cron", "timezone"),
    [("0 */4 * * *", "America/Los_Angeles"), ("30 2 * * *", "Europe/Berlin"), ("0 9-17 * * 1-5", "America/New_York")],
)
def test_the_longest_interval_is_the_one_dagsters_ticks_have_over_a_year(cron, timezone):
    fmt = "%Y-%m-%d %H:%M%z"
    ticks = dg.TimeWindowPartitionsDefinition(
        start=datetime(2027, 1, 1), end=datetime(2028, 1, 8), cron_schedule=cron, fmt=fmt, timezone=timezone
    ).get_partition_keys(current_time=datetime(2028, 1, 8))
    elapsed = [datetime.strptime(tick, fmt) for tick in ticks]
    truth = max(b - a for a, b in zip(elapsed, elapsed[1:]))
    assert longest_interval(Cadence("c", cron, timezone)) == truth


# --- configuration mistakes: one line naming the file and the entry ----------------------------------------


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        (
            'cadence: {"product.*": every_4_hours}',
            "{path}: attributes.cadence 'product.*': 'every_4_hours' names no cadence; use one of daily, weekly "
            "or define it under attributes.cadences",
        ),
        (
            'cadences: {"every 4 hours": "0 */4 * * *"}',
            "{path}: attributes.cadences.every 4 hours: a cadence name is 1 to 40 lowercase letters, digits and _ "
            "(it names every 4 hours_refresh_job)",
        ),
        (
            'cadences: {every_4_hours: {cron: "0 */4 * * *", timezone: Mars/Olympus}}',
            "{path}: attributes.cadences.every_4_hours: timezone 'Mars/Olympus' is not an IANA time zone; "
            "use one like UTC or Europe/Berlin",
        ),
        (
            'cadences: {every_4_hours: {cron: "0 */4 * * *", zone: UTC}}',
            "{path}: attributes.cadences.every_4_hours.zone: Extra inputs are not permitted: remove it or fix its name",
        ),
        (
            "cadences: {live: {timezone: UTC}}",
            "{path}: attributes.cadences.live: give it a cron, a target_lag, or both",
        ),
        (
            "cadences: {live: {target_lag: 30s}}",
            "{path}: attributes.cadences.live: target_lag '30s' is not a lag of at least 2 minutes: write a number "
            "and a unit (s, m, h, d), like 15m (sources are observed every minute)",
        ),
    ],
)
def test_configuration_mistakes_are_one_line_naming_the_file_and_entry(tmp_path, monkeypatch, attributes, message):
    config = use_config(tmp_path, monkeypatch, attributes)
    with pytest.raises(AnalyticsViewsError) as error:
        load_definitions()
    assert str(error.value) == message.replace("{path}", str(config))


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        (
            "0 */4 * *",
            "cron '0 */4 * *' is not a cron Dagster accepts: write 5 fields "
            '(minute hour day-of-month month day-of-week), like "0 */4 * * *"',
        ),
        ("61 * * * *", "cron '61 * * * *' is not a cron Dagster accepts: write 5 fields"),
        ("0 0 31 4 *", "cron '0 0 31 4 *' never fires regularly (failed to find prev date): fix its fields"),
    ],
)
def test_an_invalid_cron_is_one_line_when_definitions_load(tmp_path, monkeypatch, cron, message):
    config = use_config(tmp_path, monkeypatch, f'cadences: {{every_4_hours: "{cron}"}}')
    with pytest.raises(AnalyticsViewsError) as error:
        load_definitions()
    assert str(error.value).startswith(f"{config}: attributes.cadences.every_4_hours: {message}")
    assert "\n" not in str(error.value)


def test_a_header_cadence_the_defs_yaml_does_not_define_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "tiny.sql"
    path.write_text(
        "-- How many users are there?\n-- Grain: one row\n-- Cadence: hourly\n"
        "CREATE MATERIALIZED VIEW tiny AS SELECT count(*) AS users FROM users WITH NO DATA;\n"
    )
    view = parse_view_file(path)
    defaults = ManagedConfig()
    with pytest.raises(AnalyticsViewsError) as error:
        on_cadences((view,), defaults)
    assert str(error.value) == (
        f"{path}: cadence 'hourly' is not one of daily, weekly: define it under attributes.cadences in the "
        "component's defs.yaml, or change the header"
    )
    hourly = replace(defaults, cadences=(*defaults.cadences, Cadence("hourly", "0 * * * *")))
    assert [v.cadence for v in on_cadences((view,), hourly)] == ["hourly"]


COMMAND = str(Path(sys.executable).parent / "analytics-views")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b'# ums\xe4tze\ntype: analytics_views.MaterializedViewsComponent\n', "is not UTF-8 text (byte 0xe4 on line 1): save it as UTF-8"),
        (None, "(Is a directory): fix ANALYTICS_VIEWS_DEFS or create the file"),
        (b"type: analytics_views.MaterializedViewsComponent\nattributes: [\n", "is not valid YAML at line 3: fix it"),
        (b"type: analytics_views.MaterializedViewsComponent\nattributes:\n  refresh: {lock_timeout_s: 0}\n", "lock_timeout_s"),
        (b"type: analytics_views.MaterializedViewsComponent\nattributes:\n  refresh: {statement_timeout_s: -5}\n", "statement_timeout_s"),
        (b"type: analytics_views.MaterializedViewsComponent\nattributes:\n  refresh: {lock_timeout_s: 1e12}\n", "lock_timeout_s"),
        (b"type: analytics_views.MaterializedViewsComponent\nattributes:\n  refresh: {work_mem_mb: -1}\n", "work_mem_mb"),
        (b"type: analytics_views.MaterializedViewsComponent\natributes:\n  schemas: [public]\n", "unknown top-level key 'atributes'"),
        (b"type: analytics_views.MaterializedViewsComponent\nattributes:\n  schemas: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nests deeper"),
    ],
)
def test_an_unreadable_configuration_is_one_line_and_a_non_zero_exit(tmp_path, content, fragment):
    config = tmp_path / "defs.yaml"
    if content is None:
        config.mkdir()
    else:
        config.write_bytes(content)
    result = subprocess.run(
        [COMMAND, "refresh", "--all"],
        env={**os.environ, DEFS_ENV: str(config), "DATABASE_URL": "postgresql://unused@127.0.0.1:1/unused"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("analytics-views refresh: error: ") and str(config) in line and fragment in line


# --- discovered views: keys, names, reasons, indexes -------------------------------------------------------


def test_keys_of_discovered_views_stay_when_a_second_schema_is_discovered_later(product, tmp_path, monkeypatch):
    before = view_keys(load_definitions())
    assert "product/daily_activity" in before and len(before) == 6
    execute(
        product,
        "CREATE SCHEMA analytics;"
        "CREATE MATERIALIZED VIEW analytics.daily_activity AS SELECT 1 AS day;"
        "CREATE UNIQUE INDEX ON analytics.daily_activity (day);"
        "CREATE MATERIALIZED VIEW public.campaign_stats AS SELECT 1 AS campaign_id;",
    )
    use_config(tmp_path, monkeypatch, PRODUCT_CONFIG.replace("[product]", "[product, analytics, public]"))
    discover_views()

    after = view_keys(load_definitions())

    assert after == before | {"analytics/daily_activity", "campaign_stats"}


WEIRD_NAMES = ["revenue report", "umsätze", 'a"b;cd', "type", "a__b"]


def test_view_names_dagster_refuses_get_valid_stable_keys_and_refresh(product, tmp_path, monkeypatch):
    # Each reads a table whose name and column Dagster would refuse too.
    execute(product, 'CREATE TABLE product."order items" ("Betrag €" numeric); INSERT INTO product."order items" VALUES (2), (3)')
    for name in WEIRD_NAMES:
        view = sql.Identifier("product", name)
        execute(
            product,
            sql.SQL('CREATE MATERIALIZED VIEW {} AS SELECT sum("Betrag €") AS "Summe €" FROM product."order items";'
                    'CREATE UNIQUE INDEX ON {} ("Summe €")').format(view, view).as_string(None),
        )
    discover_views()

    defs = load_definitions()
    dg.Definitions.validate_loadable(defs)

    keys = {f"product/{key_part(name)}" for name in WEIRD_NAMES}
    assert keys <= view_keys(defs)
    specs = specs_by_key(defs)
    table = f"product/{key_part('order items')}"
    assert {dep.asset_key.to_user_string() for dep in specs[f"product/{key_part('type')}"].deps} == {table}
    assert [c.name for c in specs[table].metadata["dagster/column_schema"].columns] == ["Betrag €"]
    for name in WEIRD_NAMES:
        assert re.fullmatch(r"[A-Za-z0-9_]+_[0-9a-f]{8}", key_part(name)), name
    assert key_part("revenue report").startswith("revenue_report_") and key_part("umsätze").startswith("umsatze_")
    assert key_part("a b") != key_part("a-b")  # both sanitise to a_b: the hash keeps them apart
    assert key_part("daily_activity") == "daily_activity"
    result = defs.resolve_job_def("daily_refresh_job").execute_in_process(
        asset_selection=[dg.AssetKey.from_user_string(key) for key in keys], raise_on_error=False
    )
    assert result.success
    passed = {(e.asset_key.to_user_string(), e.check_name): e.passed for e in result.get_asset_check_evaluations()}
    assert {key for key, check in passed if check == UNIQUE_INDEX_CHECK and passed[(key, check)]} == keys
    for key in keys:
        [materialization] = [
            event.materialization
            for event in result.get_asset_materialization_events()
            if event.asset_key == dg.AssetKey.from_user_string(key)
        ]
        assert materialization.metadata["dagster/row_count"].value == 1


def test_the_missing_index_fix_quotes_the_index_discovery_recorded(product):
    execute(product, "DROP INDEX product.campaign_stats_key")
    defs = load_definitions()

    result = defs.resolve_job_def("daily_refresh_job").execute_in_process(
        asset_selection=[dg.AssetKey(["product", "campaign_stats"])], raise_on_error=False
    )

    [check] = [e for e in result.get_asset_check_evaluations() if e.check_name == UNIQUE_INDEX_CHECK]
    assert not check.passed
    assert check.description == (
        "product.campaign_stats has no unique index usable by REFRESH MATERIALIZED VIEW CONCURRENTLY; recreate the "
        "unique index `analytics-views discover` "
        "recorded: `CREATE UNIQUE INDEX campaign_stats_key ON product.campaign_stats USING btree (campaign_id);`"
    )


def as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.netloc.rpartition('@')[2]}"))


@pytest.fixture
def reader(product) -> str:
    """URL of a login role that may SELECT product.daily_activity only and owns nothing; dropped afterwards."""
    role = f"av_reader_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(product, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        admin.execute(sql.SQL("GRANT USAGE ON SCHEMA product TO {0}; GRANT SELECT ON product.daily_activity TO {0}")
                      .format(sql.Identifier(role)))
    yield as_user(product, role)
    with psycopg.connect(product, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(sql.Identifier(role)))


def test_discover_says_why_each_selected_view_was_not_taken(product, reader, tmp_path, monkeypatch, capsys):
    execute(product, "CREATE MATERIALIZED VIEW public.daily_aggregations AS SELECT 1 AS day")
    use_config(
        tmp_path,
        monkeypatch,
        f"sql_folder: {SQL_DIR}\n"
        "schemas: [product, nothing_here]\n"
        'names: ["public.daily_aggregations", "product.purchases", "product.users", "reports.*"]',
    )
    monkeypatch.setenv("DATABASE_URL", reader)

    assert cli.main(["discover"]) == 1

    out, err = capsys.readouterr()
    role = urlsplit(reader).username
    owner = "only its owner 'postgres' may refresh it: run discover and refresh as 'postgres' or a member of it"
    maintain = ", or GRANT MAINTAIN on it" if psycopg.connect(product).info.server_version >= 170000 else ""
    no_select = f"the role {role!r} may not SELECT it: grant it USAGE on the schema and SELECT on the view"
    assert out.splitlines() == [
        f"product.campaign_stats: not taken: {no_select}",
        f"product.cohort_stats: not taken: {no_select}",
        f"product.daily_activity: not taken: {owner}{maintain}",
        f"product.recent_activity: not taken: {no_select}",
        f"product.refund_totals: not taken: {no_select}",
        f"product.weekly_purchases: not taken: {no_select}",
        "public.daily_aggregations: not taken: named like this project's own view "
        f"(sql/views/daily_aggregations.sql), which manages it: to adopt the database's view instead, remove "
        f"sql_folder from {tmp_path / 'defs.yaml'}",
        "product.purchases: not taken: a view, not a materialized view (only those are refreshed)",
        "product.users: not taken: a table, not a materialized view (only those are refreshed)",
        "names entry 'reports.*' matches no materialized view: fix or remove it",
        "schemas entry 'nothing_here' holds no materialized view: fix or remove it",
        f"wrote 0 views and 0 relations they read to {tmp_path / '.local_defs_state' / 'MaterializedViewsComponent' / 'state'}",
    ]
    assert err == (
        "analytics-views discover: error: no view taken: fix attributes.schemas or attributes.names in "
        f"{tmp_path / 'defs.yaml'} (reasons above)\n"
    )


def test_a_discovered_view_may_be_named_bare_when_no_other_view_bears_its_name(product):
    from analytics_views.operations.commands import selected_views
    from analytics_views.orchestration.component import load_views

    choose = lambda *names: selected_views(all_views=False, daily=False, weekly=False, names=list(names), loaded=load_views())  # noqa: E731
    assert choose("campaign_stats", "product.cohort_stats", "product.campaign_stats") == [
        "product.campaign_stats", "product.cohort_stats"
    ]
    with pytest.raises(AnalyticsViewsError, match="unknown view 'campaign'"):
        choose("campaign")
