"""The parse cache: unchanged SQL files are not parsed again, and a change, damage or a read-only disk never
gives a stale or wrong result."""

import pickle
import shutil
import subprocess
import sys

import pytest

from analytics_views.sql_files import parse_cache
from analytics_views.paths import VIEWS_DIR
from analytics_views.sql_files.views import load_views

parse_views = load_views.__wrapped__  # without the in-process functools.cache


@pytest.fixture
def views_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(parse_cache, "CACHE_DIR", tmp_path / "cache")
    return shutil.copytree(VIEWS_DIR, tmp_path / "views")


def by_name(views):
    return {view.name: view for view in views}


def test_a_new_process_loads_unchanged_definitions_without_importing_sqlglot():
    load = "import sys, analytics_views.definitions; print('sqlglot' in sys.modules)"
    subprocess.run([sys.executable, "-c", load], check=True, capture_output=True)  # parses and keeps the result
    again = subprocess.run([sys.executable, "-c", load], check=True, capture_output=True, text=True)
    assert again.stdout.strip() == "False"


def test_the_cached_views_are_the_parsed_ones(views_dir):
    parsed = parse_views(views_dir)
    assert list((views_dir.parent / "cache").glob("views-*.pickle"))
    assert parse_views(views_dir) == parsed
    assert by_name(parsed)["campaign_aggregations"].column_lineage["revenue"] == (("payments", "amount"),)


def test_a_changed_view_file_is_parsed_again(views_dir):
    parse_views(views_dir)
    path = views_dir / "daily_aggregations.sql"
    path.write_text(path.read_text().replace("-- Cadence: daily", "-- Cadence: weekly"))
    assert by_name(parse_views(views_dir))["daily_aggregations"].cadence == "weekly"
    assert len(list((views_dir.parent / "cache").glob("views-*.pickle"))) == 1  # the stale one is gone


def test_a_damaged_cache_file_is_parsed_again_and_replaced(views_dir):
    parsed = parse_views(views_dir)
    [cache_file] = (views_dir.parent / "cache").glob("views-*.pickle")
    cache_file.write_bytes(b"not a pickle")
    assert parse_views(views_dir) == parsed
    assert pickle.loads(cache_file.read_bytes()) == parsed


def test_a_cache_that_cannot_be_written_is_ignored(views_dir, monkeypatch):
    blocked = views_dir.parent / "not-a-directory"
    blocked.write_text("")
    monkeypatch.setattr(parse_cache, "CACHE_DIR", blocked)
    assert by_name(parse_views(views_dir))["daily_aggregations"].cadence == "daily"


def test_a_malformed_file_fails_every_time_it_is_loaded(views_dir):
    (views_dir / "broken.sql").write_text("-- Says nothing useful.\nSELECT 1;\n")
    for _ in range(2):
        with pytest.raises(ValueError, match="no 'CREATE MATERIALIZED VIEW"):
            parse_views(views_dir)
