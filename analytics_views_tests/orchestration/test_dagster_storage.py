"""Dagster's storage from the project's dagster.yaml: PostgreSQL, on psycopg2 whatever the URL form."""

import dagster as dg
import pytest

from analytics_views.orchestration.dagster_storage import psycopg2_url
from analytics_views.postgres.database import libpq_url
from analytics_views.operations.services import prepare_dagster_home


@pytest.mark.parametrize(
    "given",
    ["postgresql://u:p@h:5/d", "postgres://u:p@h:5/d", "postgresql+psycopg://u:p@h:5/d", "postgresql+psycopg2://u:p@h:5/d"],
)
def test_every_url_form_is_pinned_to_psycopg2(given):
    assert psycopg2_url(given) == "postgresql+psycopg2://u:p@h:5/d"


def test_instance_from_dagster_yaml_stores_runs_in_postgres_with_psycopg2(empty_db, tmp_path, monkeypatch):
    # A plain postgresql:// URL is what SQLAlchemy 2.1 would hand to psycopg 3, breaking the event watcher.
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", libpq_url(empty_db))
    home = prepare_dagster_home(tmp_path / "dagster_home")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        storages = [instance.run_storage, instance.event_log_storage, instance.schedule_storage]
        drivers = {type(storage).__name__: storage._engine.dialect.driver for storage in storages}  # noqa: SLF001
        assert drivers == {
            "PostgresRunStorage": "psycopg2",
            "PostgresEventLogStorage": "psycopg2",
            "PostgresScheduleStorage": "psycopg2",
        }
        # And it really writes there: a run created through the instance is read back from PostgreSQL.
        run = instance.create_run_for_job(dg.GraphDefinition(name="noop").to_job())
        assert instance.get_run_by_id(run.run_id) is not None
