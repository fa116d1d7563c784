"""How a view and the tables it reads become Dagster asset specs: `ViewTranslator`, the one place that decides
their key, group, description, owners, tags, kinds, metadata, freshness and code references.

A team that adopts the project for its own views changes any of these, except the keys, by subclassing
`ViewTranslator` and naming the subclass in its defs.yaml's `translator_class` (see the class docstring).
Its input is a typed record: a `ViewDefinition` (from a SQL file, or from the catalog when `path is None`)
with its `Cadence`; for a source, a `SourceTable` (declared in sql/migrations), an `UndeclaredTable` (read
by a view, created elsewhere) or a `SourceRelation` (read by a discovered view, from the catalog).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, final

import dagster as dg

from analytics_views.orchestration import metadata_keys as keys
from analytics_views.orchestration.cadences import freshness_policy, lag_condition
from analytics_views.paths import PROJECT_ROOT
from analytics_views.postgres.database import Column
from analytics_views.sql_files.discovery import SourceRelation
from analytics_views.sql_files.managed import Cadence, matches
from analytics_views.sql_files.source_tables import ColumnDoc, SourceTable
from analytics_views.sql_files.views import ViewDefinition

GIT_URL_ENV = "ANALYTICS_VIEWS_GIT_URL"
GIT_BRANCH_ENV = "ANALYTICS_VIEWS_GIT_BRANCH"

VIEWS_GROUP = "analytics_views"
SOURCES_GROUP = "sources"
OWNERS = ("team:analytics",)
KINDS = frozenset({"postgres"})
CADENCE_TAG = "cadence"
STORAGE_KIND = "postgres"
# The schema a project view or a declared table lives in: the project's migrations create them unqualified, in
# the first schema of the refresher's search_path, which is `public` unless the role or database says otherwise.
PROJECT_SCHEMA = "public"


def table_name(schema: str | None, name: str) -> str:
    """`dagster/table_name` of a definition: `schema.name`. The database is the one DATABASE_URL names when a
    run connects, unknown while definitions load (they never connect, and one code location may serve several
    databases); each materialization records the full `database.schema.name` it refreshed."""
    return f"{schema or PROJECT_SCHEMA}.{name}"


@dataclass(frozen=True)
class UndeclaredTable:
    """A table a project view reads that sql/migrations does not create: only its name is known."""

    name: str


Source = SourceTable | UndeclaredTable | SourceRelation


@dataclass(frozen=True)
class ViewTranslatorSettings:
    """Optional behaviour of `ViewTranslator`.

    Args:
        git_url: The repository's web address (e.g. `https://github.com/acme/analytics-views`): code references
            then link to `<git_url>/blob/<git_branch>/<file>#L<line>`, for a server whose paths mean nothing to
            the analyst's browser. None: a path on this machine, which the UI opens in the local editor.
        git_branch: The branch the links name.
    """

    git_url: str | None = None
    git_branch: str = "main"
    # Per-view attributes from configuration (a defs.yaml's `translation:`), applied in order after the methods.
    overrides: tuple[ViewOverride, ...] = ()

    @classmethod
    def from_env(cls, overrides: Sequence[ViewOverride] = ()) -> ViewTranslatorSettings:
        """The settings ANALYTICS_VIEWS_GIT_URL and ANALYTICS_VIEWS_GIT_BRANCH (default main) give."""
        return cls(
            git_url=os.environ.get(GIT_URL_ENV, "").strip().rstrip("/") or None,
            git_branch=os.environ.get(GIT_BRANCH_ENV, "").strip() or "main",
            overrides=tuple(overrides),
        )


@dataclass(frozen=True)
class ViewOverride:
    """Attributes set on the assets of the views `pattern` matches (by name, or `schema.name` for views made
    elsewhere, as `cadence` patterns match). None leaves the attribute as built; tags are added."""

    pattern: str
    group_name: str | None = None
    owners: tuple[str, ...] | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    description: str | None = None

    def apply(self, view: ViewDefinition, spec: dg.AssetSpec) -> dg.AssetSpec:
        if not matches(self.pattern, view.schema, view.name):
            return spec
        replaced = {
            name: value
            for name, value in (("group_name", self.group_name), ("owners", self.owners), ("description", self.description))
            if value is not None
        }
        return spec.replace_attributes(**replaced).merge_attributes(tags=dict(self.tags))


def as_markdown(text: str) -> str:
    """The UI renders descriptions as Markdown: keep the header's line breaks (Grain:, Cadence: ...)."""
    return "\n".join(f"{line}  " if line.strip() else "" for line in text.splitlines())


def table_schema(columns: Iterable[ColumnDoc | Column]) -> dg.TableSchema:
    # A view's types are known only once PostgreSQL has created it: its materializations record them.
    return dg.TableSchema(
        columns=[dg.TableColumn(name=c.name, type=c.type or "", description=c.description) for c in columns]
    )


def column_lineage(view: ViewDefinition) -> dg.TableColumnLineage:
    return dg.TableColumnLineage(
        deps_by_column={
            column: [dg.TableColumnDep(asset_key=dg.AssetKey(table), column_name=name) for table, name in deps]
            for column, deps in view.column_lineage.items()
        }
    )


def column_lineage_table(view: ViewDefinition) -> dg.MarkdownMetadataValue:
    """The same column lineage as a table on the asset page: Dagster OSS does not draw column lineage."""
    rows = [
        f"| `{column}` | {', '.join(f'`{table}.{name}`' for table, name in deps) or '(calendar: generate_series, now())'} |"
        for column, deps in view.column_lineage.items()
    ]
    return dg.MetadataValue.md("\n".join(["| column | computed from |", "|---|---|", *rows]))


def code_reference(path: Path, line: int, settings: ViewTranslatorSettings) -> dg.CodeReferencesMetadataValue:
    """"View source" in the UI: the SQL file and line that define the asset, on this machine or, with
    `settings.git_url`, in the repository."""
    # A SQL folder of another project (a component configured elsewhere) is named by its full path.
    relative = (path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path).as_posix()
    with warnings.catch_warnings():  # beta since 1.7, yet what the UI reads; one warning per asset is noise
        warnings.simplefilter("ignore", dg.BetaWarning)
        if settings.git_url:
            url = f"{settings.git_url}/blob/{settings.git_branch}/{relative}#L{line}"
            reference = dg.UrlCodeReference(url=url, label=relative)
        else:
            reference = dg.LocalFileCodeReference(file_path=str(path), line_number=line, label=relative)
        return dg.CodeReferencesMetadataValue(code_references=[reference])


# A source's key is fixed: the views' deps and column lineage, and the discovery state, name a relation they
# read by it. (A view's key may change: assets.view_assets has the views reading it read it under its new key.)
_FIXED = ("get_source_key",)


class ViewTranslator:
    """Turns a managed view, and each table it reads, into its `dg.AssetSpec`.

    `get_asset_spec` assembles a view's spec from the small `get_*` methods below, `get_source_spec` a
    source's from the `get_source_*` ones; override any of them in a subclass, calling `super()` to extend
    the default. A view's key (`get_asset_key`) may be changed too: its jobs, checks, sensors, the CLI and the
    views reading it follow it, read from the built specs; its history (materializations, check results, the
    skip's last fingerprint) stays under the old key, so the first refresh under a new key is a full one. A
    source's key is fixed (`get_source_key`; a subclass overriding it is refused when it is defined).

    Example: a team that adopts the project for its own views puts them in its own group, with its owners
    and a tag of its own, in a module of its package that its defs.yaml names
    (`translator_class: finance_views.FinanceTranslator`)::

        from analytics_views.orchestration.translator import ViewTranslator


        class FinanceTranslator(ViewTranslator):
            def get_group_name(self, view, cadence):
                return "finance_reporting"

            def get_owners(self, view, cadence):
                return ["team:finance", "dana@example.com"]

            def get_tags(self, view, cadence):
                return {**super().get_tags(view, cadence), "domain": "finance"}

    Args:
        settings: Optional behaviour (code references into a repository). None: read from the environment
            (ANALYTICS_VIEWS_GIT_URL, ANALYTICS_VIEWS_GIT_BRANCH) each time a spec is made.
    """

    def __init__(self, settings: ViewTranslatorSettings | None = None):
        self._settings = settings

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        for name in _FIXED:
            if name in vars(cls):
                raise TypeError(
                    f"{cls.__qualname__} overrides ViewTranslator.{name}: a source's asset key is fixed (the views' "
                    "deps, column lineage and discovery state name it); override get_asset_key for a view's key"
                )

    @property
    def settings(self) -> ViewTranslatorSettings:
        return self._settings or ViewTranslatorSettings.from_env()

    # A view -------------------------------------------------------------------------------------------------

    def get_asset_spec(self, view: ViewDefinition, cadence: Cadence) -> dg.AssetSpec:
        """The view's asset spec, assembled from the methods below.

        Args:
            view: The view, from its SQL file (`view.path`) or discovered in the catalog (`view.path is None`).
            cadence: The cadence it is refreshed on (the defs.yaml's `cadence:`, else its header's `-- Cadence:`).

        Returns:
            dg.AssetSpec: What Dagster shows and schedules; `assets.view_asset` adds the refresh and its checks.
        """
        code_references = self.get_code_references(view, cadence)
        spec = dg.AssetSpec(
            key=self.get_asset_key(view),
            deps=self.get_deps(view, cadence),
            description=self.get_description(view, cadence),
            group_name=self.get_group_name(view, cadence),
            owners=self.get_owners(view, cadence),
            tags=self.get_tags(view, cadence),
            kinds=set(self.get_kinds(view, cadence)),
            code_version=self.get_code_version(view, cadence),
            freshness_policy=self.get_freshness_policy(view, cadence),
            automation_condition=self.get_automation_condition(view, cadence),
            metadata={
                **self.get_metadata(view, cadence),
                **({keys.CODE_REFERENCES: code_references} if code_references is not None else {}),
            },
        )
        for override in self.settings.overrides:
            spec = override.apply(view, spec)
        return spec

    def get_asset_key(self, view: ViewDefinition) -> dg.AssetKey:
        """The view's asset key. Changing it starts the view's history afresh under the new key (the old
        key's materializations stay in the instance, under a key no definition has).

        Args:
            view: The view.

        Returns:
            dg.AssetKey: `view.asset_key_path`: `[name]` for a project view or one discovered in the current
            schema, `[schema, name]` elsewhere, each part made valid for Dagster (`discovery.key_part`).

        Example:
            A prefix for every view of a team's (the views reading them follow)::

                class FinanceTranslator(ViewTranslator):
                    def get_asset_key(self, view):
                        return super().get_asset_key(view).with_prefix("finance")
        """
        return dg.AssetKey(list(view.asset_key_path))

    def get_deps(self, view: ViewDefinition, cadence: Cadence) -> Sequence[dg.AssetKey]:
        """The assets the view reads: its source tables and the views below it.

        Args:
            view: The view.
            cadence: Its cadence.

        Returns:
            Sequence[dg.AssetKey]: One key per relation in `view.deps`. Each must be an asset of the
            definitions (or of another code location), or Dagster shows it as an external asset.
        """
        return [dg.AssetKey.from_user_string(dep) for dep in view.deps]

    def get_description(self, view: ViewDefinition, cadence: Cadence) -> str:
        """The view's description in the UI.

        Args:
            view: The view.
            cadence: Its cadence.

        Returns:
            str: The SQL file's header comment (what the view answers, its grain and cadence, the metric
            definitions) or a discovered view's catalog comment, as Markdown with its line breaks kept.
        """
        return as_markdown(view.description)

    def get_group_name(self, view: ViewDefinition, cadence: Cadence) -> str | None:
        """The view's asset group.

        Args:
            view: The view.
            cadence: Its cadence.

        Returns:
            str | None: `analytics_views` (VIEWS_GROUP); None for Dagster's `default` group.
        """
        return VIEWS_GROUP

    def get_owners(self, view: ViewDefinition, cadence: Cadence) -> Sequence[str]:
        """Who answers for the view.

        Args:
            view: The view.
            cadence: Its cadence.

        Returns:
            Sequence[str]: `team:<name>` entries or e-mail addresses; `team:analytics` for the project's own
            views, none for a view made elsewhere (discovered): its team is not ours to invent.
        """
        return list(OWNERS) if view.path is not None else []

    def get_tags(self, view: ViewDefinition, cadence: Cadence) -> Mapping[str, str]:
        """The view's tags, which the UI and asset selections (`tag:cadence=daily`) filter on.

        Args:
            view: The view.
            cadence: Its cadence.

        Returns:
            Mapping[str, str]: `{"cadence": <cadence name>}`; keep it when adding tags (`super().get_tags`).
        """
        return {CADENCE_TAG: cadence.name}

    def get_kinds(self, view: ViewDefinition, cadence: Cadence) -> Iterable[str]:
        """The kinds the UI shows as badges on the view's node.

        Args:
            view: The view.
            cadence: Its cadence.

        Returns:
            Iterable[str]: `{"postgres"}`.
        """
        return set(KINDS)

    def get_code_version(self, view: ViewDefinition, cadence: Cadence) -> str | None:
        """The view's code version: a changed definition shows in the UI (the view's materializations record
        the version they were refreshed with) and makes the view stale.

        Args:
            view: The view.
            cadence: Its cadence.

        Returns:
            str | None: The first 16 hex digits of the SHA-256 of the view's query (`view.query`: the SQL file's
            `AS <query>`, or the catalog definition discovery recorded). Its header, column comments and index
            do not change what it computes, and do not change it. None: no code version.
        """
        return hashlib.sha256(view.query.encode()).hexdigest()[:16]

    def get_metadata(self, view: ViewDefinition, cadence: Cadence) -> Mapping[str, Any]:
        """The view's definition metadata, besides its code references (`get_code_references`).

        Args:
            view: The view.
            cadence: Its cadence.

        Returns:
            Mapping[str, Any]: Dagster's `dagster/column_schema` (from the file's COMMENT ON COLUMN or the
            catalog), its `dagster/table_name` (`schema.name`, see `table_name`) and `dagster/storage_kind`
            (`postgres`) and, for a project view, `dagster/column_lineage`; ours under `analytics_views/`
            (metadata_keys.py): a project view's grain, SQL file and lineage table, a discovered view's schema,
            definition and discovery fingerprint. A subclass's own keys belong in a namespace of its own.
        """
        identity = {keys.TABLE_NAME: table_name(view.schema, view.name), keys.STORAGE_KIND: STORAGE_KIND}
        if view.path is not None:
            return {
                **identity,
                keys.GRAIN: view.grain,
                keys.SQL_FILE: f"sql/views/{view.path.name}",
                keys.COLUMN_SCHEMA: table_schema(view.columns),
                keys.COLUMN_LINEAGE: column_lineage(view),
                keys.COLUMN_LINEAGE_TABLE: column_lineage_table(view),
            }
        return {
            **identity,
            keys.SCHEMA: view.schema,
            keys.COLUMN_SCHEMA: table_schema(view.columns),
            keys.DEFINITION: dg.MetadataValue.md(f"```sql\n{view.sql}\n```"),
            keys.FINGERPRINT: view.fingerprint,
        }

    def get_freshness_policy(self, view: ViewDefinition, cadence: Cadence) -> dg.FreshnessPolicy | None:
        """When the view counts as late (the daemon evaluates it; the UI shows it).

        Args:
            view: The view.
            cadence: Its cadence.

        Returns:
            dg.FreshnessPolicy | None: Failed once the last refresh is older than the cadence's longest
            interval between ticks plus slack (cadences.freshness_window: daily 26 h, weekly 7 d 2 h); with a
            target lag, warned once it is older than the lag (cadences.freshness_policy); None for no
            freshness policy.
        """
        return freshness_policy(cadence)

    def get_automation_condition(self, view: ViewDefinition, cadence: Cadence) -> dg.AutomationCondition | None:
        """When Dagster's declarative automation requests the view's refresh.

        Args:
            view: The view.
            cadence: Its cadence.

        Returns:
            dg.AutomationCondition | None: For a cadence with a `target_lag`, a refresh once what the view
            reads has a new data version, within the lag (cadences.lag_condition); None on a cron-only
            cadence, refreshed by its schedule alone.
        """
        return lag_condition(cadence)

    def get_code_references(self, view: ViewDefinition, cadence: Cadence) -> dg.CodeReferencesMetadataValue | None:
        """The UI's "View source" link (`dagster/code_references`).

        Args:
            view: The view.
            cadence: Its cadence.

        Returns:
            dg.CodeReferencesMetadataValue | None: The `CREATE MATERIALIZED VIEW` line of the view's SQL file,
            locally or in the repository (`settings.git_url`); None for a discovered view, which has no file.
        """
        if view.path is None or view.line is None:
            return None
        return code_reference(view.path, view.line, self.settings)

    # A source: a table or a relation the views read -------------------------------------------------------

    def get_source_spec(self, source: Source) -> dg.AssetSpec:
        """A source's asset spec, assembled from the `get_source_*` methods. Sources are not materialized here
        (the application writes them), so they have no freshness policy.

        Args:
            source: A table sql/migrations declares (`SourceTable`), one it does not (`UndeclaredTable`), or
                a relation a discovered view reads (`SourceRelation`).

        Returns:
            dg.AssetSpec: The source's spec.
        """
        code_references = self.get_source_code_references(source)
        return dg.AssetSpec(
            key=self.get_source_key(source),
            description=self.get_source_description(source),
            group_name=self.get_source_group_name(source),
            owners=self.get_source_owners(source),
            tags=self.get_source_tags(source),
            kinds=set(self.get_source_kinds(source)),
            metadata={
                **self.get_source_metadata(source),
                **({keys.CODE_REFERENCES: code_references} if code_references is not None else {}),
            },
        )

    @final
    def get_source_key(self, source: Source) -> dg.AssetKey:
        """The source's asset key: fixed, not overridable (the views' deps and column lineage name it).

        Args:
            source: The source.

        Returns:
            dg.AssetKey: `[name]` for a table of the project's migrations; a relation's discovered key.
        """
        if isinstance(source, SourceRelation):
            return dg.AssetKey(list(source.key))
        return dg.AssetKey(source.name)

    def get_source_description(self, source: Source) -> str:
        """The source's description in the UI.

        Args:
            source: The source.

        Returns:
            str: Its `COMMENT ON TABLE` (migration or catalog), else a line saying what it is.
        """
        if isinstance(source, SourceRelation):
            return source.comment or f"Source {source.kind} `{source.schema}.{source.name}`."
        if isinstance(source, UndeclaredTable):
            return f"Source table `{source.name}`, not created by sql/migrations."
        return source.description or f"Source table `{source.name}`, written by the product application."

    def get_source_group_name(self, source: Source) -> str | None:
        """The source's asset group.

        Args:
            source: The source.

        Returns:
            str | None: `sources` (SOURCES_GROUP).
        """
        return SOURCES_GROUP

    def get_source_owners(self, source: Source) -> Sequence[str]:
        """Who answers for the source.

        Args:
            source: The source.

        Returns:
            Sequence[str]: `team:analytics` by default.
        """
        return list(OWNERS)

    def get_source_tags(self, source: Source) -> Mapping[str, str]:
        """The source's tags.

        Args:
            source: The source.

        Returns:
            Mapping[str, str]: No tags by default.
        """
        return {}

    def get_source_kinds(self, source: Source) -> Iterable[str]:
        """The kinds the UI shows on the source's node.

        Args:
            source: The source.

        Returns:
            Iterable[str]: `{"postgres"}`.
        """
        return set(KINDS)

    def get_source_metadata(self, source: Source) -> Mapping[str, Any]:
        """The source's definition metadata, besides its code references.

        Args:
            source: The source.

        Returns:
            Mapping[str, Any]: Every source's `dagster/table_name` (`schema.name`) and `dagster/storage_kind`
            (`postgres`); a declared table's typed `dagster/column_schema`; a catalog relation's column schema
            and `analytics_views/schema`.
        """
        if isinstance(source, SourceRelation):
            return {
                keys.TABLE_NAME: table_name(source.schema, source.name),
                keys.STORAGE_KIND: STORAGE_KIND,
                keys.COLUMN_SCHEMA: table_schema(source.columns),
                keys.SCHEMA: source.schema,
            }
        identity = {keys.TABLE_NAME: table_name(None, source.name), keys.STORAGE_KIND: STORAGE_KIND}
        if isinstance(source, UndeclaredTable):
            return identity
        return {**identity, keys.COLUMN_SCHEMA: table_schema(source.columns)}

    def get_source_code_references(self, source: Source) -> dg.CodeReferencesMetadataValue | None:
        """The UI's "View source" link for the source.

        Args:
            source: The source.

        Returns:
            dg.CodeReferencesMetadataValue | None: The `CREATE TABLE` line in sql/migrations for a declared
            table; None otherwise.
        """
        if isinstance(source, SourceTable):
            return code_reference(source.path, source.line, self.settings)
        return None
