"""Faults an operator meets in the PostgreSQL layer (issue 26), each one line naming the view and the fix."""

import psycopg
import pytest

from analytics_views.postgres.refresh import RefreshError, refresh_view


@pytest.mark.parametrize(
    ("replacement", "kind"),
    [
        ("CREATE TABLE product.refund_totals AS SELECT user_id, sum(amount) AS refunded FROM product.refunds GROUP BY 1", "table"),
        ("CREATE VIEW product.refund_totals AS SELECT user_id, sum(amount) AS refunded FROM product.refunds GROUP BY 1", "plain view"),
    ],
)
def test_a_discovered_view_replaced_by_another_kind_of_relation_is_named_with_the_fix(product_db, replacement, kind):
    with psycopg.connect(product_db, autocommit=True) as conn:
        last = refresh_view(conn, "refund_totals", schema="product")
        conn.execute("DROP MATERIALIZED VIEW product.refund_totals")
        conn.execute(replacement)
        with pytest.raises(RefreshError) as raised:
            refresh_view(conn, "refund_totals", schema="product", skip_if_unchanged_since=last.sources_fingerprint)
    assert str(raised.value) == (
        f"product.refund_totals is now a {kind}, not a materialized view: it was replaced since it was discovered "
        "or migrated; run `analytics-views discover` (a view made elsewhere) or `analytics-views migrate` (the "
        "project's own)"
    )
    assert not raised.value.transient
