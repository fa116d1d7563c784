"""`MaterializedViewsComponent`: the materialized views a `dg` project manages, configured in a defs.yaml.

```yaml
type: analytics_views.MaterializedViewsComponent
attributes:
  sql_folder: sql                 # views/*.sql (and tests/, migrations/) made by this project
  schemas: [reporting]            # and views made elsewhere, discovered into the component's state
  cadence: {"reporting.weekly_*": weekly}
```

Views made elsewhere are read from the catalog into the component's Dagster defs state (a state-backed
component: `analytics-views discover` or `dg utils refresh-defs-state` write it, with the database), and the
definitions are built from that state only: loading them never connects to the database. By default the state
is a file beside the defs folder (`LOCAL_FILESYSTEM`), never refreshed by a loading process (`refresh_if_dev`
is off), so the UI, the daemon, every run and `dg` load the same views.

This project's own instance is `analytics_views/orchestration/defs/views/defs.yaml`. ANALYTICS_VIEWS_DEFS may
name another defs.yaml to load in its place (the tests use it, and the runs the CLI launches inherit it).
"""

import asyncio
import importlib
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dagster as dg
import pydantic
import yaml
from dagster.components import DefsStateConfig, DefsStateConfigArgs, ResolvedDefsStateConfig
from pydantic import Field, PrivateAttr, field_validator

from analytics_views.errors import AnalyticsViewsError
from analytics_views.orchestration import definition_checks
from analytics_views.orchestration.assets import ViewAsset, build_assets, build_sources, managed_view_assets, refresh_views
from analytics_views.orchestration.destinations import Email, Slack, Webhook
from analytics_views.orchestration.jobs import REFRESH_EXECUTOR, automation_sensor, build_jobs, build_schedules
from analytics_views.orchestration.notifications import KINDS, NotificationSettings, notification_sensors
from analytics_views.orchestration.observed_sources import observed_sources
from analytics_views.orchestration.translator import ViewOverride, ViewTranslator, ViewTranslatorSettings
from analytics_views.orchestration.resources import AnalyticsDatabase
from analytics_views.paths import DEFS_ENV, DEFS_YAML, PROJECT_ROOT, defs_yaml_in_use
from analytics_views.postgres.database import database_url_from_env
from analytics_views.postgres.refresh import RefreshSettings
from analytics_views.sql_files.discovery import discover, state_text
from analytics_views.sql_files.managed import ManagedConfig, managed_config
from analytics_views.sql_files.views import ViewDefinition

COMPONENT_TYPE = "analytics_views.MaterializedViewsComponent"
DATABASE_RESOURCE = "analytics_db"
OLD_CONFIG_ENV = "ANALYTICS_VIEWS_CONFIG"  # named a views.toml before the component; refused with the fix
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class CadenceSchedule(dg.Model):
    cron: str | None = Field(default=None, description='When the cadence\'s job runs, e.g. "0 */4 * * *" (5 fields).')
    timezone: str = Field(default="UTC", description="IANA time zone of the cron, e.g. Europe/Berlin.")
    target_lag: str | None = Field(
        default=None,
        description="Refresh the views within this lag of a change of what they read, and not when nothing "
        "changed (declarative automation), e.g. 15m; instead of or beside the cron. At least 2m.",
    )


class ViewAttributes(dg.Model):
    """Attributes set on the assets of the views a `translation` pattern matches."""

    group_name: str | None = Field(default=None, description="Asset group (default analytics_views).")
    owners: list[str] | None = Field(default=None, description="Owners, e.g. [team:analytics, someone@example.com].")
    tags: dict[str, str] | None = Field(default=None, description="Tags added to the asset's own.")
    description: str | None = Field(default=None, description="Replaces the description from the SQL header or comment.")


class DatabaseSettings(dg.Model):
    url_env: str = Field(
        default="DATABASE_URL",
        description="Name of the environment variable holding the libpq URL of the database (never the URL itself).",
    )


MAX_TIMEOUT_S = 2_147_483  # INT_MAX milliseconds
MAX_WORK_MEM_MB = 2_097_151  # INT_MAX kilobytes


class RefreshDefaults(dg.Model):
    """The `analytics_db` resource's refresh settings (a run may still override them in its run config)."""

    lock_timeout_s: float = Field(default=RefreshSettings.lock_timeout_s, description="Longest wait for a view's lock, s.")
    statement_timeout_s: float = Field(default=RefreshSettings.statement_timeout_s, description="Longest refresh, s.")
    skip_unchanged: bool = Field(default=True, description="Skip a view proven unchanged since its last refresh.")
    work_mem_mb: int | None = Field(default=RefreshSettings.work_mem_mb, description="work_mem of refreshes, MB; unset: the server's.")
    timezone: str = Field(default=RefreshSettings.timezone, description="TimeZone every refresh and data test runs under.")
    refresh_connections: int = Field(default=4, description="Views of a run refreshed at the same time, each on a connection (at least 1).")

    # PostgreSQL reads a 0 timeout as "no limit" (a wait for ever) and takes at most INT_MAX ms or kB.
    # Validators, not Field(gt=...): Dagster's component models refuse constrained fields.
    @field_validator("lock_timeout_s", "statement_timeout_s")
    @classmethod
    def _a_timeout(cls, value: float, info) -> float:
        if not 0 < value <= MAX_TIMEOUT_S:
            raise ValueError(f"refresh.{info.field_name} must be over 0 and at most {MAX_TIMEOUT_S} seconds, not {value:g}")
        return value

    @field_validator("work_mem_mb")
    @classmethod
    def _a_work_mem(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= MAX_WORK_MEM_MB:
            raise ValueError(f"refresh.work_mem_mb must be 1 to {MAX_WORK_MEM_MB} (MB), or left out, not {value}")
        return value


class EmailSettings(dg.Model):
    """Email through an SMTP server; its password only from the environment."""

    smtp_host: str = Field(description="The SMTP server, e.g. smtp.example.com.")
    smtp_port: int = Field(default=587, description="Its port: 587 for starttls, 465 for ssl, 25 for none.")
    security: Literal["starttls", "ssl", "none"] = Field(
        default="starttls", description="starttls (default), ssl, or none (a relay on a trusted network only)."
    )
    sender: str = Field(description="The From address, e.g. analytics-views@example.com.")
    to: list[str] = Field(description="The addresses to tell (at least one).")
    username: str | None = Field(default=None, description="The SMTP login; default the sender. Unused without password_env.")
    password_env: str | None = Field(default=None, description="Environment variable holding the SMTP password; unset: no login.")


class SlackSettings(dg.Model):
    """A Slack channel, through a bot token (dagster-slack's client) from the environment."""

    channel: str = Field(description='The channel, e.g. "#data-alerts" (the bot must be in it).')
    token_env: str = Field(default="SLACK_BOT_TOKEN", description="Environment variable holding the bot token (xoxb-...).")
    api_url: str | None = Field(default=None, description="Slack's API address; default https://slack.com/api/.")


class WebhookSettings(dg.Model):
    """A JSON POST to a URL from the environment (it often holds a token)."""

    url_env: str = Field(default="ANALYTICS_VIEWS_WEBHOOK_URL", description="Environment variable holding the URL.")


class NotificationsSettings(dg.Model):
    """Who hears of a failed refresh run, a failed ERROR check or a late view; no destination, no sensor."""

    ui_url: str = Field(
        default="http://127.0.0.1:3000", description="The Dagster UI's address as the readers reach it: the links' base."
    )
    # Not `on:`, which YAML reads as the boolean true.
    events: list[Literal["run_failure", "check_failure", "late"]] = Field(
        default_factory=lambda: list(KINDS), description="What to tell: run_failure, check_failure, late (default all)."
    )
    email: EmailSettings | None = Field(default=None, description="Email, through SMTP.")
    slack: SlackSettings | None = Field(default=None, description="A Slack channel.")
    webhook: WebhookSettings | None = Field(default=None, description="A JSON webhook.")


class MaterializedViewsComponent(dg.StateBackedComponent, dg.Resolvable, dg.Model):
    """PostgreSQL materialized views as Dagster assets, refreshed on cron cadences, with checks.

    The views of a SQL folder, and views made elsewhere (schemas, names) discovered into the component's state
    by `analytics-views discover` or `dg utils refresh-defs-state`. Each view is an asset with the
    `unique_index`, SQL and data-test checks; each cadence with views gets a job and a schedule."""

    sql_folder: str | None = Field(
        default=None,
        description="Folder (relative to this defs.yaml) whose views/*.sql are the views this project makes; "
        "tests/<view>/*.sql are their data tests, migrations/*.sql declare the tables they read. Unset: none.",
    )
    schemas: list[str] = Field(default_factory=list, description="Every materialized view of these schemas (made elsewhere).")
    names: list[str] = Field(
        default_factory=list,
        description='Views made elsewhere by name: exact or glob, optionally schema-qualified ("reporting.*").',
    )
    cadences: dict[str, CadenceSchedule | str] = Field(
        default_factory=dict,
        description="Cadences by name: {cron, timezone, target_lag} (a cron, a target lag or both) or just a cron "
        "(UTC). daily (0 3 * * *) and weekly "
        "(0 4 * * 1), UTC, are always defined; a name is 1 to 40 lowercase letters, digits and _.",
    )
    cadence: dict[str, str] = Field(
        default_factory=dict,
        description='Which view runs on which cadence: "pattern": cadence, first match wins; by name ("daily_*") '
        'or schema-qualified ("reporting.*"). Unmatched: the file header\'s `-- Cadence:`, or daily.',
    )
    data_tests: str | None = Field(
        default=None, description="Folder (relative to this defs.yaml) of discovered views' tests: <schema>.<view>/<test>.sql."
    )
    database: DatabaseSettings = Field(default_factory=DatabaseSettings, description="The analytics database.")
    refresh: RefreshDefaults = Field(default_factory=RefreshDefaults, description="Refresh settings.")
    translation: dict[str, ViewAttributes] = Field(
        default_factory=dict,
        description="Per-view asset attributes by pattern (as in `cadence`); every matching pattern applies, in order.",
    )
    translator_class: str | None = Field(
        default=None,
        description="A ViewTranslator subclass deciding what each view's asset shows (group, owners, tags, ...), "
        "as module.Class (e.g. finance_views.FinanceTranslator); it gets `translation:` too. Unset: ViewTranslator.",
    )
    notifications: NotificationsSettings | None = Field(
        default=None, description="Email, Slack and webhook notices of failed runs and checks and late views."
    )
    # State in a file beside the defs folder, written only by discovery: never by a process loading definitions.
    defs_state: ResolvedDefsStateConfig = DefsStateConfigArgs.local_filesystem().model_copy(
        update={"refresh_if_dev": False}
    )

    _defs_yaml: Path | None = PrivateAttr(default=None)  # where it was configured: relative paths start there
    _built: ManagedConfig | None = PrivateAttr(default=None)  # what build_defs_from_state last built
    _keys: dict[str, dg.AssetKey] = PrivateAttr(default_factory=dict)  # and each view's asset key, by its label
    _written: tuple[Path, dict] | None = PrivateAttr(default=None)  # what write_state_to_path last wrote

    # --- loading -------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, attributes, context: dg.ComponentLoadContext) -> "MaterializedViewsComponent":
        component = super().load(attributes, context)
        component._defs_yaml = next(
            (path for path in (context.path / "defs.yaml", context.path / "defs.yml") if path.exists()), context.path
        )
        return component

    @classmethod
    def from_defs_yaml(cls, path: Path) -> "MaterializedViewsComponent":
        """The component a defs.yaml outside the project's defs folder configures (ANALYTICS_VIEWS_DEFS)."""
        path = path.resolve()
        try:
            document = yaml.safe_load(path.read_bytes().decode("utf-8-sig"))
        except OSError as error:
            raise AnalyticsViewsError(f"cannot read {path} ({error.strerror}): fix {DEFS_ENV} or create the file") from None
        except UnicodeDecodeError as error:
            line = error.object[: error.start].count(b"\n") + 1
            raise AnalyticsViewsError(
                f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} on line {line}): save it as UTF-8"
            ) from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise AnalyticsViewsError(f"{path} is not valid YAML{where}: fix it") from None
        except RecursionError:
            raise AnalyticsViewsError(f"{path} nests deeper than a defs.yaml can: fix it") from None
        component_type = cls.named_by(document.get("type") if isinstance(document, dict) else None)
        if component_type is None:
            raise AnalyticsViewsError(
                f"{path}: type must be {COMPONENT_TYPE} or a subclass of it (module.Class), with its settings under attributes:"
            )
        if unknown := sorted(set(map(str, document)) - DEFS_YAML_KEYS):
            raise AnalyticsViewsError(
                f"{path}: unknown top-level key {unknown[0]!r}: a defs.yaml holds {', '.join(sorted(DEFS_YAML_KEYS))} "
                "(the settings go under attributes:)"
            )
        with one_line_errors(path):
            component = component_type.from_attributes_dict(attributes=document.get("attributes") or {})
        component._defs_yaml = path
        return component

    @classmethod
    def named_by(cls, type_name: object) -> "type[MaterializedViewsComponent] | None":
        """The class a defs.yaml's `type:` names, as Dagster's loader finds it: this one, or a subclass of it
        imported from its module (a team's subclass overriding `translator` or `execute`); None if it names neither."""
        if type_name in (COMPONENT_TYPE, f"{cls.__module__}.{cls.__qualname__}"):
            return cls
        module_name, _, class_name = str(type_name).rpartition(".")
        try:
            found = getattr(importlib.import_module(module_name), class_name, None) if module_name else None
        except ModuleNotFoundError as error:
            if error.name is not None and module_name.startswith(error.name):
                return None
            raise AnalyticsViewsError(f"type: cannot import {module_name} ({error}): install what it imports") from None
        except Exception as error:  # noqa: BLE001 - the team's module failed while importing
            raise AnalyticsViewsError(f"type: cannot import {module_name} ({type(error).__name__}: {error}): fix it") from None
        return found if isinstance(found, type) and issubclass(found, cls) else None

    @property
    def defs_yaml(self) -> Path:
        if self._defs_yaml is None:  # built in Python: relative paths are relative to the working directory
            return Path.cwd() / "defs.yaml"
        return self._defs_yaml

    def _path(self, value: str | None) -> Path | None:
        return (self.defs_yaml.parent / value).resolve() if value is not None else None

    def _check_env_name(self, entry: str, variable: str, what: str, example: str) -> None:
        if not _ENV_NAME.fullmatch(variable):
            raise AnalyticsViewsError(
                f"{self.defs_yaml}: attributes.{entry} names the environment variable holding the {what} "
                f"(like {example}), never the {what} itself"
            )

    def managed_config(self, state_file: Path | None = None) -> ManagedConfig:
        """The settings, checked (one line naming the defs.yaml and the entry for a mistake)."""
        self._check_env_name("database.url_env", self.database.url_env, "URL", "DATABASE_URL")
        return managed_config(
            self.defs_yaml,
            sql_dir=self._path(self.sql_folder),
            schemas=self.schemas,
            names=self.names,
            cadences={
                name: (entry, "UTC") if isinstance(entry, str) else (entry.cron, entry.timezone, entry.target_lag)
                for name, entry in self.cadences.items()
            },
            cadence=self.cadence,
            data_tests=self._path(self.data_tests),
            state_file=state_file,
        )

    @property
    def overrides(self) -> tuple[ViewOverride, ...]:
        return tuple(
            ViewOverride(
                pattern=pattern,
                group_name=attributes.group_name,
                owners=tuple(attributes.owners) if attributes.owners is not None else None,
                tags=attributes.tags or {},
                description=attributes.description,
            )
            for pattern, attributes in self.translation.items()
        )

    def notification_settings(self) -> NotificationSettings | None:
        """The notifications' destinations, checked (one line naming the entry); None when none is configured."""
        settings = self.notifications
        if settings is None:
            return None
        for entry, variable in (
            ("email.password_env", settings.email and settings.email.password_env),
            ("slack.token_env", settings.slack and settings.slack.token_env),
            ("webhook.url_env", settings.webhook and settings.webhook.url_env),
        ):
            if variable:
                self._check_env_name(f"notifications.{entry}", variable, "secret", "SMTP_PASSWORD")
        if not settings.ui_url.startswith(("http://", "https://")):
            raise AnalyticsViewsError(
                f"{self.defs_yaml}: attributes.notifications.ui_url is not an http(s) address: set it to the "
                "Dagster UI's address as the readers of the notices reach it, e.g. https://dagster.example.com"
            )
        if settings.email and not settings.email.to:
            raise AnalyticsViewsError(f"{self.defs_yaml}: attributes.notifications.email.to is empty: name an address to tell")
        destinations = []
        if email := settings.email:
            destinations.append(
                Email(email.smtp_host, email.smtp_port, email.sender, tuple(email.to), email.security, email.username, email.password_env)
            )
        if slack := settings.slack:
            destinations.append(Slack(slack.channel, slack.token_env, slack.api_url))
        if webhook := settings.webhook:
            destinations.append(Webhook(webhook.url_env))
        return NotificationSettings(
            ui_url=settings.ui_url,
            destinations=tuple(destinations),
            kinds=frozenset(settings.events),
            url_envs=(self.database.url_env, "DAGSTER_POSTGRES_URL"),
        )

    @property
    def analytics_db(self) -> AnalyticsDatabase:
        return AnalyticsDatabase(url=dg.EnvVar(self.database.url_env), **self.refresh.model_dump())

    # --- state ---------------------------------------------------------------------------------------------

    @property
    def defs_state_config(self) -> DefsStateConfig:
        return DefsStateConfig.from_args(self.defs_state, default_key=type(self).__name__)

    def write_state_to_path(self, state_path: Path) -> None:
        """Discovery: the views made elsewhere the settings select, read from the catalog (DATABASE_URL, or the
        variable `database.url_env` names). Selecting none, it writes an empty state without connecting."""
        config = self.managed_config()
        url = database_url_from_env(self.database.url_env) if config.discovers else ""
        state = discover(url, config)
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(state_text(state))
        self._written = (state_path, state)

    def build_defs_from_state(self, context: dg.ComponentLoadContext | None, state_path: Path | None) -> dg.Definitions:
        return self.definitions(state_path)

    def definitions(self, state_file: Path | None) -> dg.Definitions:
        """Everything Dagster needs, with the views made elsewhere as the state at `state_file` has them: each
        view's asset as `translator()` makes it, refreshed by `execute`, a multi-asset per cadence; the sources
        they read, observed; the definition checks; a job and schedule per cadence with views; the
        `analytics_db` resource; with notifications, a sensor per destination (notifications.py)."""
        config = self.managed_config(state_file)
        translator = self.translator()
        assets = managed_view_assets(config, translator)  # each view's key decided here, read from them below
        views = {asset.key: asset.view for asset in assets}
        jobs = build_jobs(config, views)
        sources = observed_sources(build_sources(config, translator))
        notifications = self.notification_settings()
        defs = dg.Definitions(
            assets=[*([sources.asset] if sources else []), *build_assets(config, assets, self.execute)],
            asset_checks=[definition_checks.definition_checks(views)] if views else [],
            jobs=[
                *jobs.values(),
                *([definition_checks.definition_checks_job(views)] if views else []),
                *([sources.job] if sources else []),
            ],
            schedules=build_schedules(jobs),
            sensors=[
                *([sources.sensor] if sources else []),
                *automation_sensor(config, views),
                *([definition_checks.definition_checks_sensor(views)] if views else []),
                *(notification_sensors(notifications, config, assets) if notifications else []),
            ],
            resources={DATABASE_RESOURCE: self.analytics_db},
            # Also for views materialized by hand in the UI (Dagster's implicit asset job).
            executor=REFRESH_EXECUTOR,
        )
        self._built = config
        self._keys = {asset.view.label: asset.key for asset in assets}
        return defs

    def execute(self, context: dg.AssetExecutionContext, analytics_db: AnalyticsDatabase, views: Sequence[ViewAsset]) -> Iterator:
        """What a cadence's step does with the views selected in its run: refreshes them in dependency order over
        a pool of connections, yielding each view's materialization and check results as it is done
        (`assets.refresh_views`). A subclass may wrap it, as dagster-sling's component lets `execute` be:

            class AuditedViews(MaterializedViewsComponent):
                def execute(self, context, analytics_db, views):
                    context.log.info(f"refreshing {len(views)} views")
                    yield from super().execute(context, analytics_db, views)
        """
        yield from refresh_views(context, analytics_db, views)

    def translator(self) -> ViewTranslator:
        """What each view's asset is called and shows (translator.py), with the defs.yaml's per-view
        `translation:`: the `translator_class` the defs.yaml names, or ViewTranslator. A team's subclass of the
        component may override this instead; its defs.yaml names the subclass as its `type:` and configures
        everything else still."""
        return self.translator_type()(self.translator_settings())

    def translator_type(self) -> type[ViewTranslator]:
        """The class `translator_class` names (module.Class), imported; a mistake is one line naming the entry."""
        if self.translator_class is None:
            return ViewTranslator
        where = f"{self.defs_yaml}: attributes.translator_class"
        module_name, _, class_name = self.translator_class.replace(":", ".").rpartition(".")
        try:
            found = getattr(importlib.import_module(module_name), class_name) if module_name else None
        except ImportError as error:
            raise AnalyticsViewsError(f"{where}: cannot import {module_name} ({error}): fix the module's name or install it") from None
        except AttributeError:
            raise AnalyticsViewsError(f"{where}: {module_name} has no {class_name}: fix the class's name") from None
        if not (isinstance(found, type) and issubclass(found, ViewTranslator)):
            raise AnalyticsViewsError(
                f"{where}: {self.translator_class!r} is not a ViewTranslator subclass: name one as module.Class"
            )
        return found

    def translator_settings(self) -> ViewTranslatorSettings:
        """The translator's settings: the defs.yaml's `translation:` and the environment's source links."""
        return ViewTranslatorSettings.from_env(overrides=self.overrides)

    def beside_state_file(self) -> Path:
        """Where a defs.yaml outside a dg project keeps its state: as Dagster keeps it in a defs folder."""
        key = re.sub(r"[^A-Za-z0-9._-]", "__", self.defs_state_config.key)
        return self.defs_yaml.parent / ".local_defs_state" / key / "state"


# --- the project's component, for definitions.py and the CLI ----------------------------------------------


# Where each views.toml setting went: the attributes of the component's defs.yaml.
MOVED_SETTINGS = (
    "sql_folder (was project_views), schemas, names, cadences, cadence, data_tests; "
    "state_file is gone, the component keeps its discovery state"
)


def refuse_views_toml() -> None:
    """One line when a views.toml would have been read: its settings are in the component's defs.yaml now."""
    if (PROJECT_ROOT / "views.toml").exists():
        raise AnalyticsViewsError(
            f"views.toml is no longer read: move its settings to {DEFS_YAML} (attributes: {MOVED_SETTINGS}), "
            f"then delete {PROJECT_ROOT / 'views.toml'}"
        )
    if old := os.environ.get(OLD_CONFIG_ENV):
        raise AnalyticsViewsError(
            f"{old} ({OLD_CONFIG_ENV}) is no longer read: move its settings to a defs.yaml like {DEFS_YAML} "
            f"(attributes: {MOVED_SETTINGS}) and set {DEFS_ENV} to that file instead"
        )


# The keys Dagster reads at the top of a component's defs.yaml (dagster.components' ComponentFileModel).
DEFS_YAML_KEYS = frozenset({"type", "attributes", "template_vars_module", "requirements", "post_processing"})


@contextmanager
def one_line_errors(defs_yaml: Path) -> Iterator[None]:
    """Dagster reports a component's mistakes with the YAML around them; ours stay one line naming the file.

    Loading the component tree, Dagster calls its own preview functions (dg.load_from_defs_folder hides their
    warnings the same way) and pydantic's deprecated `parse_obj_as` (dagster-io/dagster#33880): those
    warnings are not ours to fix, and would fail `python -W error`."""
    try:
        with warnings.catch_warnings():
            for category in (dg.PreviewWarning, dg.BetaWarning, pydantic.warnings.PydanticDeprecatedSince20):
                warnings.simplefilter("ignore", category)
            yield
    except AnalyticsViewsError:
        raise
    except Exception as error:  # noqa: BLE001 - Dagster wraps a component's errors in its own kinds
        cause = error
        while cause is not None and not isinstance(cause, (AnalyticsViewsError, pydantic.ValidationError)):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, AnalyticsViewsError):
            raise cause from None
        if isinstance(cause, pydantic.ValidationError):
            first = cause.errors()[0]
            # pydantic names the member of a union it tried (`CadenceSchedule`, `dict[str,...]`): not a key of the
            # file. Dagster's loader adds " at <file>:<line>" to the last key and starts with "attributes".
            models = {
                model.__name__
                for model in (
                    CadenceSchedule, ViewAttributes, DatabaseSettings, RefreshDefaults,
                    NotificationsSettings, EmailSettings, SlackSettings, WebhookSettings,
                )
            }
            path = ".".join(str(part) for part in first["loc"])
            line = ""
            if at := re.fullmatch(r"(.*) at .*:(\d+)", path):
                path, line = at[1], f":{at[2]}"
            keys = [key for key in path.split(".") if key not in models and "[" not in key]
            where = ".".join(["attributes", *(keys[1:] if keys[:1] == ["attributes"] else keys)])
            fix = "remove it or fix its name" if first["type"] == "extra_forbidden" else "fix it"
            if first["type"] == "extra_forbidden" and re.search(r"(password|token|url|secret)$", keys[-1] if keys else ""):
                fix = f"secrets come only from the environment: name the variable holding it in {keys[-1]}_env"
            raise AnalyticsViewsError(f"{defs_yaml}{line}: {where}: {first['msg']}: {fix}") from None
        raise


def load_definitions() -> dg.Definitions:
    """What Dagster loads: the project's defs folder, or the defs.yaml ANALYTICS_VIEWS_DEFS names."""
    return load_views().defs


@dataclass(frozen=True)
class LoadedViews:
    component: MaterializedViewsComponent
    config: ManagedConfig  # with the discovery state the definitions were built from
    defs: dg.Definitions

    def key(self, view: ViewDefinition) -> dg.AssetKey:
        """The view's asset key, as the definitions built it (the translator decides it)."""
        return self.component._keys[view.label]


def load_views() -> LoadedViews:
    """The views component the definitions load, its settings and its definitions; a mistake is one line."""
    refuse_views_toml()
    if os.environ.get(DEFS_ENV):
        component = MaterializedViewsComponent.from_defs_yaml(Path(os.environ[DEFS_ENV]))
        state_file = component.beside_state_file()
        with one_line_errors(component.defs_yaml):
            defs = component.definitions(state_file if state_file.exists() else None)
        return LoadedViews(component, component._built, defs)
    tree = dg.ComponentTree.for_project(PROJECT_ROOT)
    with one_line_errors(DEFS_YAML):
        defs = tree.build_defs()
        component = project_component(tree)
    return LoadedViews(component, component._built, defs)


def project_component(tree: dg.ComponentTree) -> MaterializedViewsComponent:
    components = tree.get_all_components(MaterializedViewsComponent)
    if len(components) != 1:
        raise AnalyticsViewsError(
            f"{tree.defs_module_path} holds {len(components)} MaterializedViewsComponent instances; the "
            f"analytics-views command manages exactly one ({DEFS_YAML})"
        )
    return components[0]


def discover_views() -> tuple[Path, dict, ManagedConfig, str]:
    """Writes the discovery state of the component the definitions load; returns where, the state, the
    settings and the name of the database URL's variable."""
    refuse_views_toml()
    with one_line_errors(defs_yaml_in_use()):
        if os.environ.get(DEFS_ENV):
            component = MaterializedViewsComponent.from_defs_yaml(Path(os.environ[DEFS_ENV]))
            write = lambda: component.write_state_to_path(component.beside_state_file())  # noqa: E731
        else:
            component = project_component(dg.ComponentTree.for_project(PROJECT_ROOT))
            # What `dg utils refresh-defs-state` runs: the state lands where Dagster reads it.
            write = lambda: asyncio.run(component.refresh_state(PROJECT_ROOT))  # noqa: E731
        config = component.managed_config()
        if not config.discovers:
            raise AnalyticsViewsError(
                f"{config.where} selects no views made elsewhere: add attributes.schemas or attributes.names, "
                "then discover again"
            )
        write()
    state_file, state = component._written
    return state_file, state, component.managed_config(state_file), component.database.url_env
