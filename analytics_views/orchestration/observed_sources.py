"""The source relations the views read, observed: each an observable source asset whose data version changes
whenever what the views read from it may have changed (postgres/source_versions.py).

All sources are observed together, by one catalog look: the sensor `observe_sources_sensor` (running from the
daemon's start, every OBSERVE_INTERVAL_S) records an observation for each source whose version changed since its
last one, as runless asset events (no run, no process, no planned events), so a source's latest observation
says when it last changed. The sources' multi-asset `observe_sources` does the same look as one step, for the
UI's *Observe* and the job `observe_sources_job`. A source PostgreSQL cannot vouch for (a foreign table, a view
over a volatile function, track_counts off) gets a new version at each look, as an unsettled one does (some
session may hold uncounted writes): the views reading it may have fallen behind; its observation's
`analytics_views/observation_note` says why.
"""

import hashlib
import json
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import dagster as dg

from analytics_views.orchestration import metadata_keys as keys
from analytics_views.orchestration.jobs import REFRESH_EXECUTOR
from analytics_views.orchestration.resources import AnalyticsDatabase
from analytics_views.orchestration.translator import Source
from analytics_views.postgres.source_versions import source_versions
from analytics_views.sql_files.discovery import SourceRelation

OBSERVE_STEP = "observe_sources"
OBSERVE_JOB = "observe_sources_job"
OBSERVE_SENSOR = "observe_sources_sensor"
# Every minute: a target lag of 2 minutes (the least a cadence may declare) sees a change within half its lag.
OBSERVE_INTERVAL_S = 60
RELATION = keys.ours("relation")  # the relation observed, as PostgreSQL names it
OBSERVATION_NOTE = keys.ours("observation_note")  # why a version is new at each look; absent when settled


def relation_name(source: Source) -> str:
    """The source as PostgreSQL reads a regclass: a project table unqualified (the search_path finds it, as the
    views' SQL does), a catalog relation schema-qualified; each part quoted."""

    def quoted(part: str) -> str:
        return '"' + part.replace('"', '""') + '"'

    if isinstance(source, SourceRelation):
        return f"{quoted(source.schema)}.{quoted(source.name)}"
    return quoted(source.name)


def observe(
    conn, relations: Mapping[dg.AssetKey, str], last: dict[dg.AssetKey, str] | None = None
) -> list[dg.AssetObservation]:
    """An observation of each source whose version differs from `last` (the digest of its last observed
    version, updated here; None: observe all). `conn` in autocommit; catalog and statistics reads only."""
    keys_in_order = list(relations)
    found = source_versions(conn, [relations[key] for key in keys_in_order])
    now = None
    observations = []
    for key, version in zip(keys_in_order, found):
        value = version.version
        if value is None:
            now = now or conn.execute("SELECT clock_timestamp()::text").fetchone()[0]
            value = f"unobserved@{now}"
        if last is not None:
            if last.get(key) == _digest(value):
                continue
            last[key] = _digest(value)
        note = (
            f"cannot be observed: {version.reason}; a new version at each look"
            if version.version is None
            else version.reason
            if not version.settled
            else ""
        )
        observations.append(
            dg.AssetObservation(
                asset_key=key,
                metadata={RELATION: version.relation, **({OBSERVATION_NOTE: note} if note else {})},
                tags={keys.DATA_VERSION_TAG: value, keys.DATA_VERSION_IS_USER_PROVIDED_TAG: "true"},
            )
        )
    return observations


def _digest(version: str) -> str:
    return hashlib.md5(version.encode()).hexdigest()[:12]


def read_cursor(cursor: str | None) -> dict[dg.AssetKey, str]:
    """The sensor's cursor: each source's last recorded version, digested ({key: digest} as JSON). The
    instance's asset records do not hold runless observations, so the sensor remembers them itself."""
    return {dg.AssetKey.from_user_string(key): digest for key, digest in json.loads(cursor or "{}").items()}


def write_cursor(last: Mapping[dg.AssetKey, str]) -> str:
    return json.dumps({key.to_user_string(): digest for key, digest in sorted(last.items(), key=lambda kv: kv[0].path)})


@dataclass(frozen=True)
class ObservedSources:
    asset: dg.AssetsDefinition
    job: object  # define_asset_job's (its class is not public API)
    sensor: dg.SensorDefinition


def observed_sources(sources: Mapping[dg.AssetKey, tuple[Source, dg.AssetSpec]]) -> ObservedSources | None:
    """The sources' observable multi-asset (their specs as the translator made them), its job and its sensor;
    None without sources."""
    if not sources:
        return None
    relations = {key: relation_name(source) for key, (source, _) in sources.items()}
    specs = [spec for _, spec in sources.values()]

    def observe_sources(context: dg.AssetExecutionContext, analytics_db: AnalyticsDatabase):
        selected = {key: relations[key] for key in relations if key in context.selected_asset_keys}
        with analytics_db.connection("analytics-views observe sources") as conn:
            for observation in observe(conn, selected):
                # Every selected source is observed: an output left out would fail the step.
                yield dg.ObserveResult(
                    asset_key=observation.asset_key,
                    metadata=observation.metadata,
                    data_version=dg.DataVersion(observation.tags[keys.DATA_VERSION_TAG]),
                )

    with warnings.catch_warnings():  # beta since 1.5, yet Dagster's one public way to observe many assets in a step
        warnings.simplefilter("ignore", dg.BetaWarning)
        observe_sources = dg.multi_observable_source_asset(
            name=OBSERVE_STEP,
            specs=specs,
            description="Observes every source relation the views read in one catalog look: a new data version "
            "for each whose contents may have changed.",
            can_subset=True,
        )(observe_sources)

    job = dg.define_asset_job(
        OBSERVE_JOB,
        selection=dg.AssetSelection.assets(*relations),
        description="Observes every source relation (what observe_sources_sensor does without a run).",
        executor_def=REFRESH_EXECUTOR,
    )

    @dg.sensor(
        name=OBSERVE_SENSOR,
        minimum_interval_seconds=OBSERVE_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Observes every source relation the views read in one catalog look, and records an "
        "observation for each whose data version changed (no run).",
    )
    def observe_sources_sensor(context: dg.SensorEvaluationContext, analytics_db: AnalyticsDatabase):
        started = time.perf_counter()
        last = read_cursor(context.cursor)
        with analytics_db.connection("analytics-views observe sources") as conn:
            observations = observe(conn, relations, last)
        took = f"{len(relations)} sources observed in {(time.perf_counter() - started) * 1000:.0f} ms"
        if not observations:
            return dg.SkipReason(f"no source changed ({took})")
        context.log.info(f"{len(observations)} changed; {took}")
        return dg.SensorResult(asset_events=observations, cursor=write_cursor(last))

    return ObservedSources(observe_sources, job, observe_sources_sensor)
