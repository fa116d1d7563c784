"""Source tables as the migrations declare them: what Dagster shows without asking a database."""

import psycopg

from analytics_views.sql_files.source_tables import load_source_tables

CATALOG = """
SELECT c.relname, obj_description(c.oid, 'pg_class'), a.attname, col_description(c.oid, a.attnum)
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
JOIN pg_attribute AS a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relname <> 'analytics_views_migrations'
ORDER BY c.relname, a.attnum
"""


def test_users_table_is_read_with_types_and_comments():
    users = load_source_tables()["users"]
    assert users.description == "One row per user account, created at signup."
    assert [(c.name, c.type) for c in users.columns] == [
        ("user_id", "bigint"),
        ("signed_up_at", "timestamptz"),
        ("campaign_id", "bigint"),
        ("country", "text"),
        ("plan", "text"),
    ]
    assert users.columns[1].description == "Instant the account was created; its UTC day is the user's signup cohort."
    assert users.path.name == "001_source_tables.sql"
    assert users.path.read_text().splitlines()[users.line - 1] == "CREATE TABLE users ("


def test_payment_amount_keeps_its_numeric_precision():
    [amount] = [c for c in load_source_tables()["payments"].columns if c.name == "amount"]
    assert amount.type == "numeric(12, 2)"


def test_declared_tables_columns_and_comments_match_the_migrated_database(migrated_db):
    declared = {
        (table.name, table.description, column.name, column.description)
        for table in load_source_tables().values()
        for column in table.columns
    }
    with psycopg.connect(migrated_db) as conn:
        catalog = set(conn.execute(CATALOG).fetchall())
    assert declared == catalog
    assert len(catalog) == 20  # 5 tables: 4 + 5 + 4 + 4 + 3 columns
