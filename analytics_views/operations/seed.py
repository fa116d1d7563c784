"""`analytics-views seed`: deterministic demo data, generated server-side by sql/seed.sql."""

from dataclasses import dataclass

from analytics_views.postgres.database import connect
from analytics_views.errors import AnalyticsViewsError
from analytics_views.paths import SQL_DIR

SEED_SQL = SQL_DIR / "seed.sql"
DEFAULT_USERS = 5000
DEFAULT_DAYS = 730
DEFAULT_SEED = 42


@dataclass(frozen=True)
class SeedSummary:
    users: int
    events: int
    payments: int
    campaigns: int


def seed(url: str, *, users: int = DEFAULT_USERS, days: int = DEFAULT_DAYS, seed: int = DEFAULT_SEED) -> SeedSummary:
    """Replace the source tables' rows with generated ones; the same arguments give the same rows."""
    if users < 1 or days < 1:
        raise AnalyticsViewsError("seed needs --users and --days of at least 1")
    with connect(url) as conn, conn.transaction():
        if conn.execute("SELECT to_regclass('events')").fetchone()[0] is None:
            raise AnalyticsViewsError("the source tables do not exist: run `analytics-views migrate` first")
        for name, value in {"users": users, "days": days, "seed": seed}.items():
            conn.execute("SELECT set_config(%s, %s, true)", [f"analytics_seed.{name}", str(value)])
        conn.execute(SEED_SQL.read_text())
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM events),"
            " (SELECT count(*) FROM payments), (SELECT count(*) FROM campaigns)"
        ).fetchone()
    return SeedSummary(*counts)
