"""The metadata keys this project writes on assets, materializations and asset checks.

Ours are namespaced `analytics_views/...`, as dagster-dbt's are `dagster_dbt/...`: they never collide with
Dagster's standard `dagster/...` keys, which the UI reads (row count, table name, column schema and lineage,
code references) and which we write under their own names, nor with keys a team adds in its translator.
"""

NAMESPACE = "analytics_views"


def ours(name: str) -> str:
    """`name` in our namespace: `analytics_views/<name>`."""
    return f"{NAMESPACE}/{name}"


# On a view's or a source's definition (translator.py).
GRAIN = ours("grain")  # the header's `-- Grain:` line
SQL_FILE = ours("sql_file")  # sql/views/<name>.sql
COLUMN_LINEAGE_TABLE = ours("column_lineage")  # Markdown table: Dagster OSS does not draw dagster/column_lineage
SCHEMA = ours("schema")  # the schema a discovered view or a relation it reads lives in
DEFINITION = ours("definition")  # a discovered view's query, as the catalog gave it
FINGERPRINT = ours("fingerprint")  # of a discovered view's definition and columns, at discovery

# On each materialization of a view (assets.py).
SOURCES_FINGERPRINT = ours("sources_fingerprint")  # what the next refresh compares to skip unchanged sources
SIZE_BYTES = ours("size_bytes")
SIZE = ours("size")  # pg_size_pretty
REFRESH_DURATION_S = ours("refresh_duration_s")
REFRESH_MODE = ours("refresh_mode")  # refresh.py's modes: initial plain, concurrent, swap, skipped
REFRESH_NOTE = ours("refresh_note")  # why a swap fell back or a skip was not possible; absent when none
REFRESH_TIMEZONE = ours("refresh_timezone")

# Tags Dagster reads the versions of a materialization or an observation from (its data_version.py): a step
# that yields AssetMaterialization events itself (refresh_step.as_event) writes them itself.
DATA_VERSION_TAG = "dagster/data_version"
DATA_VERSION_IS_USER_PROVIDED_TAG = "dagster/data_version_is_user_provided"
CODE_VERSION_TAG = "dagster/code_version"

# On asset check results (assets.py, view_checks.py).
INDEX = ours("index")  # the unique_index check: the usable unique index, or "none"
FINDINGS = ours("findings")  # static checks: Markdown list of findings and fixes
UNDECIDED = ours("undecided")  # static checks: what could not be decided
FAILING_ROWS = ours("failing_rows")  # data tests
FAILING_SAMPLE = ours("failing_sample")
TEST_FILE = ours("test_file")
ERROR = ours("error")

# Dagster's standard keys, written under their own names.
ROW_COUNT = "dagster/row_count"
TABLE_NAME = "dagster/table_name"
STORAGE_KIND = "dagster/storage_kind"  # with dagster/table_name, the storage address the UI links tools' assets by
COLUMN_SCHEMA = "dagster/column_schema"
COLUMN_LINEAGE = "dagster/column_lineage"
CODE_REFERENCES = "dagster/code_references"
