"""Every property PostgreSQL keeps on a materialized view survives a build-and-swap, or makes the refresh
fall back to CONCURRENTLY with a note naming it (swap.py). One row per property, from the catalog:
pg_class, pg_attribute, pg_index, pg_depend, pg_description, pg_seclabel, pg_event_trigger, pg_type."""

import psycopg
import pytest

from analytics_views.postgres.modes import RefreshMode
from analytics_views.postgres.refresh import refresh_view

WORDS = """
CREATE TABLE source_words (n int PRIMARY KEY, word text NOT NULL);
INSERT INTO source_words VALUES (1, 'one'), (2, 'two'), (3, 'three');
CREATE MATERIALIZED VIEW words AS SELECT s.n, s.word, length(s.word) AS letters FROM source_words AS s WITH NO DATA;
CREATE UNIQUE INDEX words_key ON words (n);
CREATE INDEX words_upper ON words (upper(word));
"""


@pytest.fixture
def words(empty_db):
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(WORDS)
        refresh_view(conn, "words")  # first population: plain
        yield conn


def rows(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute("SELECT n, word, letters FROM words ORDER BY n").fetchall()


def refresh_after_a_write(conn: psycopg.Connection):
    conn.execute("INSERT INTO source_words VALUES (4, 'four')")
    outcome = refresh_view(conn, "words", strategy="swap")
    assert rows(conn)[-1] == (4, "four", 4)  # refreshed either way
    return outcome


def column(attribute: str, name: str) -> str:
    return f"SELECT {attribute} FROM pg_attribute WHERE attrelid = 'words'::regclass AND attname = '{name}'"


# property, how to set it, how to read it, what it reads once set
CARRIED = [
    ("reloptions", "ALTER MATERIALIZED VIEW words SET (fillfactor = 70, autovacuum_enabled = false)",
     "SELECT reloptions FROM pg_class WHERE oid = 'words'::regclass", ["fillfactor=70", "autovacuum_enabled=false"]),
    ("TOAST reloptions", "ALTER MATERIALIZED VIEW words SET (toast.autovacuum_enabled = false)",
     "SELECT t.reloptions FROM pg_class AS c JOIN pg_class AS t ON t.oid = c.reltoastrelid WHERE c.oid = 'words'::regclass",
     ["autovacuum_enabled=false"]),
    ("column SET STATISTICS", "ALTER MATERIALIZED VIEW words ALTER COLUMN word SET STATISTICS 500",
     column("attstattarget::int", "word"), 500),
    ("column n_distinct", "ALTER MATERIALIZED VIEW words ALTER COLUMN letters SET (n_distinct = -0.5)",
     column("ARRAY(SELECT o FROM unnest(attoptions) AS o WHERE o LIKE 'n_distinct%%')", "letters"), ["n_distinct=-0.5"]),
    ("column SET STORAGE", "ALTER MATERIALIZED VIEW words ALTER COLUMN word SET STORAGE MAIN",
     column("attstorage::text", "word"), "m"),
    ("column SET COMPRESSION", "ALTER MATERIALIZED VIEW words ALTER COLUMN word SET COMPRESSION pglz",
     column("attcompression::text", "word"), "p"),
    ("column comment", "COMMENT ON COLUMN words.word IS 'The word.'", "SELECT col_description('words'::regclass, 2)",
     "The word."),
    ("view comment", "COMMENT ON MATERIALIZED VIEW words IS 'Words.'", "SELECT obj_description('words'::regclass)",
     "Words."),
    ("CLUSTER ON", "ALTER MATERIALIZED VIEW words CLUSTER ON words_upper",
     "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = 'words'::regclass AND indisclustered", "words_upper"),
    ("index column SET STATISTICS", "ALTER INDEX words_upper ALTER COLUMN 1 SET STATISTICS 300",
     "SELECT attstattarget::int FROM pg_attribute WHERE attrelid = 'words_upper'::regclass", 300),
    ("index reloptions", "ALTER INDEX words_upper SET (fillfactor = 60)",
     "SELECT reloptions FROM pg_class WHERE oid = 'words_upper'::regclass", ["fillfactor=60"]),
    ("index comment", "COMMENT ON INDEX words_upper IS 'Case-blind look-ups.'",
     "SELECT obj_description('words_upper'::regclass)", "Case-blind look-ups."),
    ("partial index with NULLS NOT DISTINCT",
     "CREATE UNIQUE INDEX words_long ON words (letters, word) NULLS NOT DISTINCT WHERE letters > 3",
     "SELECT pg_get_indexdef('words_long'::regclass)",
     "CREATE UNIQUE INDEX words_long ON public.words USING btree (letters, word) NULLS NOT DISTINCT WHERE (letters > 3)"),
    ("REPLICA IDENTITY FULL", "ALTER TABLE words REPLICA IDENTITY FULL",
     "SELECT relreplident::text FROM pg_class WHERE oid = 'words'::regclass", "f"),
    ("table access method",
     "CREATE ACCESS METHOD heap_copy TYPE TABLE HANDLER heap_tableam_handler;"
     " ALTER MATERIALIZED VIEW words SET ACCESS METHOD heap_copy",
     "SELECT amname::text FROM pg_class JOIN pg_am ON pg_am.oid = relam WHERE pg_class.oid = 'words'::regclass", "heap_copy"),
    ("grants, with default privileges that would add others",
     "GRANT SELECT ON words TO PUBLIC; ALTER DEFAULT PRIVILEGES GRANT INSERT ON TABLES TO PUBLIC",
     "SELECT array_agg(privilege_type::text) FROM aclexplode((SELECT relacl FROM pg_class WHERE oid = 'words'::regclass))"
     " WHERE grantee = 0", ["SELECT"]),
    ("a session's default_table_access_method and default_tablespace",
     "CREATE ACCESS METHOD heap_copy TYPE TABLE HANDLER heap_tableam_handler;"
     " SET default_table_access_method = heap_copy; SET default_tablespace = pg_global",
     "SELECT amname::text || ' ' || reltablespace FROM pg_class JOIN pg_am ON pg_am.oid = relam"
     " WHERE pg_class.oid = 'words'::regclass", "heap 0"),
]  # fmt: skip


@pytest.mark.parametrize(("setting", "probe", "expected"), [row[1:] for row in CARRIED], ids=[row[0] for row in CARRIED])
def test_swap_carries_the_property_over(words, setting, probe, expected):
    words.execute(setting)
    assert words.execute(probe).fetchone()[0] == expected

    outcome = refresh_after_a_write(words)

    assert (outcome.mode, outcome.note) == (RefreshMode.SWAP, "")
    assert words.execute(probe).fetchone()[0] == expected


# property, how to set it, what the fallback's note says
FALLS_BACK = [
    ("a dependent view", "CREATE VIEW long_words AS SELECT n FROM words WHERE letters > 3", "view long_words depends on it"),
    ("extended statistics", "CREATE STATISTICS words_stats ON n, letters FROM words", "words_stats depends on it"),
    ("a function over its array type", "CREATE FUNCTION word_count(words[]) RETURNS int LANGUAGE sql AS 'SELECT 1'",
     "function word_count(words[]) depends on it"),
    ("column privileges", "GRANT SELECT (n) ON words TO PUBLIC", "column privileges"),
    ("a security label", "INSERT INTO pg_seclabel VALUES ('words'::regclass, 'pg_class'::regclass, 0, 'test', 'secret')",
     "security labels"),
    ("a security label on an index",
     "INSERT INTO pg_seclabel VALUES ('words_upper'::regclass, 'pg_class'::regclass, 0, 'test', 'secret')",
     "security labels"),
    ("DEPENDS ON EXTENSION", "ALTER MATERIALIZED VIEW words DEPENDS ON EXTENSION plpgsql", "extension"),
    ("an event trigger",
     "CREATE FUNCTION note_ddl() RETURNS event_trigger LANGUAGE plpgsql AS 'BEGIN END';"
     " CREATE EVENT TRIGGER watch_ddl ON ddl_command_end EXECUTE FUNCTION note_ddl()",
     "event trigger"),
    ("a comment on its rewrite rule", "COMMENT ON RULE \"_RETURN\" ON words IS 'The query.'", "rewrite rule"),
    ("a comment on its row type", "COMMENT ON TYPE words IS 'A word.'", "row type"),
    ("a grant on its row type", "GRANT USAGE ON TYPE words TO PUBLIC", "row type"),
    ("an invalid index", "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'words_upper'::regclass",
     "invalid index"),
    ("the rebuilt view's name taken", "CREATE TABLE words__swap ()", "name the rebuilt view"),
    ("an index's rebuilt name taken", "CREATE TABLE words_upper__swap ()", "name the rebuilt view"),
]  # fmt: skip


@pytest.mark.parametrize(("setting", "note"), [row[1:] for row in FALLS_BACK], ids=[row[0] for row in FALLS_BACK])
def test_swap_falls_back_to_concurrently_naming_the_property(words, setting, note):
    words.execute(setting)
    oid = words.execute("SELECT 'words'::regclass::oid").fetchone()[0]

    outcome = refresh_after_a_write(words)

    assert outcome.mode == RefreshMode.CONCURRENT
    assert outcome.note.startswith("build-and-swap does not apply: ") and note in outcome.note
    assert words.execute("SELECT 'words'::regclass::oid").fetchone()[0] == oid  # the same relation, refreshed


@pytest.fixture
def in_place_tablespace(words):
    """A tablespace inside the data directory (a developer setting, enough to move relations)."""
    name = f"swap_test_{words.info.backend_pid}"
    words.execute("SET allow_in_place_tablespaces = on")
    words.execute(f"CREATE TABLESPACE {name} LOCATION ''")
    yield name
    words.execute("DROP MATERIALIZED VIEW IF EXISTS words")
    words.execute(f"DROP TABLESPACE {name}")


def test_swap_keeps_the_view_and_its_indexes_in_their_tablespaces(words, in_place_tablespace):
    words.execute(f"ALTER MATERIALIZED VIEW words SET TABLESPACE {in_place_tablespace}")
    words.execute(f"ALTER INDEX words_upper SET TABLESPACE {in_place_tablespace}")
    probe = (
        "SELECT c.relname::text, coalesce(t.spcname::text, '') FROM pg_class AS c"
        " LEFT JOIN pg_tablespace AS t ON t.oid = c.reltablespace"
        " WHERE c.relname IN ('words', 'words_key', 'words_upper') ORDER BY 1"
    )
    expected = [("words", in_place_tablespace), ("words_key", ""), ("words_upper", in_place_tablespace)]
    assert words.execute(probe).fetchall() == expected

    outcome = refresh_after_a_write(words)

    assert (outcome.mode, outcome.note) == (RefreshMode.SWAP, "")
    assert words.execute(probe).fetchall() == expected


# What PostgreSQL does not allow on a materialized view, so no swap has to carry it: if a version starts
# allowing one, its row fails here and swap.py must learn to carry it or fall back.
REFUSED = [
    ("a rule", "CREATE RULE no_insert AS ON INSERT TO words DO INSTEAD NOTHING"),
    ("a trigger", "CREATE FUNCTION ignore() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END';"
     " CREATE TRIGGER ignored AFTER INSERT ON words FOR EACH ROW EXECUTE FUNCTION ignore()"),
    ("row-level security", "ALTER TABLE words ENABLE ROW LEVEL SECURITY"),
    ("a policy", "CREATE POLICY everyone ON words USING (true)"),
    ("a publication", "CREATE PUBLICATION words_out FOR TABLE words"),
    ("inheritance", "ALTER TABLE words INHERIT source_words"),
    ("a constraint", "ALTER TABLE words ADD CONSTRAINT positive CHECK (n > 0)"),
    ("NOT NULL", "ALTER MATERIALIZED VIEW words ALTER COLUMN n SET NOT NULL"),
    ("UNLOGGED", "CREATE UNLOGGED MATERIALIZED VIEW unlogged_words AS SELECT 1"),
    ("REPLICA IDENTITY USING INDEX", "ALTER TABLE words REPLICA IDENTITY USING INDEX words_key"),
]  # fmt: skip


@pytest.mark.parametrize("statement", [row[1] for row in REFUSED], ids=[row[0] for row in REFUSED])
def test_postgresql_refuses_the_property_on_a_materialized_view(words, statement):
    with pytest.raises(psycopg.errors.Error):
        words.execute(statement)
