"""Refreshing one materialized view without blocking its readers."""

import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

from analytics_views.database import view_state
from analytics_views.errors import AnalyticsViewsError

CONCURRENT = "concurrent"
# CONCURRENTLY is refused on a view that was never populated; the first refresh must be a plain one.
INITIAL_PLAIN = "plain (first population)"


@dataclass(frozen=True)
class RefreshOutcome:
    view: str
    mode: str
    duration_s: float


def refresh_view(conn: psycopg.Connection, view: str) -> RefreshOutcome:
    """REFRESH MATERIALIZED VIEW CONCURRENTLY, or a plain REFRESH when the view was never populated."""
    state = view_state(conn, view)
    if not state.exists:
        raise AnalyticsViewsError(
            f"materialized view {view!r} does not exist in this database: run `analytics-views migrate`"
        )
    if state.populated and state.unique_index is None:
        raise AnalyticsViewsError(
            f"{view} has no unique index usable by REFRESH MATERIALIZED VIEW CONCURRENTLY: create one "
            "(unique, no WHERE clause, plain columns; see its file in sql/views/) and refresh again"
        )
    mode = CONCURRENT if state.populated else INITIAL_PLAIN
    statement = sql.SQL(
        "REFRESH MATERIALIZED VIEW CONCURRENTLY {}" if mode == CONCURRENT else "REFRESH MATERIALIZED VIEW {}"
    ).format(sql.Identifier(view))
    started = time.perf_counter()
    with conn.transaction():
        conn.execute(statement)
    return RefreshOutcome(view=view, mode=mode, duration_s=time.perf_counter() - started)
