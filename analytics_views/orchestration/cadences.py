"""When each cadence's job runs and how late its views may be: its cron checked by Dagster, its period.

A view is late once its last refresh is older than the longest interval between two consecutive ticks of
its cadence plus slack for a slow or retried run: 2 hours, or half the interval when that is shorter, so a
missed tick is always reported before the next one is due (daily: 26 h; every 4 hours: 6 h; hourly: 90 min).

A cadence with a `target_lag` gives its views an automation condition (`lag_condition`): Dagster's declarative
automation requests a view when something it reads has a new data version (a source's observation, a view's
refresh) since the view was last requested or refreshed, at most once per half lag, never while it runs or
while a view it reads has a failed blocking check; nothing changed, nothing requested. Its views warn once
their last refresh is older than the lag: Dagster's freshness counts time since the last materialization,
not since a source changed, so a view whose sources stayed quiet would read as late: it fails only after the
cron's window (beside a cron) or QUIET_FAIL_WINDOW (without one).
"""

from datetime import date, datetime, timedelta
from functools import cache
from zoneinfo import ZoneInfo

import dagster as dg

from analytics_views.errors import AnalyticsViewsError
from analytics_views.sql_files.managed import Cadence

MAX_SLACK = timedelta(hours=2)
QUIET_FAIL_WINDOW = timedelta(days=7)
# Ticks are read over up to three years, one of them a leap year, from a fixed date: the same on every load.
_FROM = datetime(2027, 1, 1)
_HORIZONS = (timedelta(weeks=3), timedelta(days=3 * 366), timedelta(days=13 * 366))
_KEY_FORMAT = "%Y-%m-%d %H:%M"
_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


def check_cadence(cadence: Cadence) -> None:
    """One line naming the entry when Dagster would refuse the cadence's schedule (cron or time zone)."""
    if cadence.cron is None:
        return
    try:
        dg.ScheduleDefinition(
            name=cadence.schedule_name,
            cron_schedule=cadence.cron,
            job_name=cadence.job_name,
            execution_timezone=cadence.timezone,
        )
    except dg.DagsterInvalidDefinitionError:
        raise AnalyticsViewsError(
            f"{cadence.where}: cron {cadence.cron!r} is not a cron Dagster accepts: write 5 fields "
            '(minute hour day-of-month month day-of-week), like "0 */4 * * *"'
        ) from None
    longest_interval(cadence)


def _ticks(cron: str, horizon: timedelta) -> list[datetime]:
    """The cron's ticks from _FROM on, in wall-clock time (read in UTC, where wall clock and elapsed time agree)."""
    end = _FROM + horizon
    partitions = dg.TimeWindowPartitionsDefinition(
        start=_FROM, end=end, cron_schedule=cron, fmt=_KEY_FORMAT, timezone="UTC"
    )
    # A partition's key is the tick that starts it: every tick in the horizon but the last.
    return [datetime.strptime(key, _KEY_FORMAT) for key in partitions.get_partition_keys(current_time=end)]


def _offset_range(timezone: str) -> timedelta:
    """How far the zone's UTC offset moves within a year (DST): a gap across a fall-back lasts that much longer."""
    zone = ZoneInfo(timezone)
    offsets = {
        datetime.combine(date.fromordinal(_FROM.toordinal() + day), datetime.min.time(), zone).utcoffset()
        for day in range(0, 366, 7)
    }
    return max(offsets) - min(offsets)


@cache
def _longest_interval(cron: str, timezone: str) -> timedelta:
    minute, hour, day_of_month, month, day_of_week = _ALIASES.get(cron, cron).split()
    # The ticks are the minutes and hours their fields allow, on the days the other fields allow: read apart,
    # a cron firing every minute costs 24 + 60 ticks, not a year of them.
    hours = [tick.hour for tick in _ticks(f"0 {hour} * * *", timedelta(days=2)) if tick.date() == _FROM.date()]
    minutes = [tick.minute for tick in _ticks(f"{minute} * * * *", timedelta(hours=2)) if tick.hour == _FROM.hour]
    times = sorted(timedelta(hours=h, minutes=m) for h in hours for m in minutes)
    # Days repeat weekly unless the day of month or month is restricted.
    every_month_day = day_of_month in ("*", "?") and month in ("*", "?")
    for horizon in _HORIZONS[:1] if every_month_day else _HORIZONS[1:]:
        days = _ticks(f"0 0 {day_of_month} {month} {day_of_week}", horizon)
        if len(days) >= 2:
            break
    else:
        raise ValueError("fires less than twice in 13 years")
    within_day = max((b - a for a, b in zip(times, times[1:])), default=timedelta(0))
    between_days = max(b - a for a, b in zip(days, days[1:])) - times[-1] + times[0]
    return max(within_day, between_days) + _offset_range(timezone)


def longest_interval(cadence: Cadence) -> timedelta:
    """The longest time between two consecutive ticks: exact in zones without DST and for crons firing at most
    daily; for faster crons in DST zones it may exceed the truth by the DST hour."""
    try:
        return _longest_interval(cadence.cron, cadence.timezone)
    except Exception as error:  # noqa: BLE001 - Dagster's cron iterator raises its own kinds ("failed to find prev date")
        raise AnalyticsViewsError(
            f"{cadence.where}: cron {cadence.cron!r} never fires regularly ({error}): fix its fields"
        ) from None


def freshness_window(cadence: Cadence) -> timedelta:
    """How old a view's last refresh may be before it is late (its freshness policy's fail window)."""
    if cadence.cron is None:
        return max(QUIET_FAIL_WINDOW, 2 * cadence.target_lag)
    interval = longest_interval(cadence)
    return interval + min(MAX_SLACK, interval / 2)


def freshness_policy(cadence: Cadence) -> dg.FreshnessPolicy:
    """Failed after `freshness_window`; with a target lag, warned once the last refresh is older than the lag."""
    fail = freshness_window(cadence)
    lag = cadence.target_lag
    return dg.FreshnessPolicy.time_window(fail_window=fail, warn_window=lag if lag is not None and lag < fail else None)


def lag_cron(lag: timedelta) -> str:
    """A cron ticking at most every half lag, on a divisor of the hour (or of the day)."""
    minutes = max(1, int(lag.total_seconds() // 120))
    if minutes < 60:
        step = max(d for d in (1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30) if d <= minutes)
        return f"*/{step} * * * *" if step > 1 else "* * * * *"
    hours = minutes // 60
    if hours < 24:
        step = max(d for d in (1, 2, 3, 4, 6, 8, 12) if d <= hours)
        return f"0 */{step} * * *" if step > 1 else "0 * * * *"
    return "0 0 * * *"


def lag_condition(cadence: Cadence) -> dg.AutomationCondition | None:
    """The declarative automation of a cadence's views: None without a target lag (the cron alone)."""
    if cadence.target_lag is None:
        return None
    condition = dg.AutomationCondition
    # A view read in the same tick is requested with it (one run, in dependency order): the view over a view
    # does not wait for the next tick.
    read_changed = condition.any_deps_match(condition.data_version_changed() | condition.will_be_requested())
    changed_since_refresh = read_changed.since(condition.newly_requested() | condition.newly_updated())
    blocked = condition.any_deps_match(condition.any_checks_match(condition.check_failed(), blocking_only=True))
    tick = condition.cron_tick_passed(lag_cron(cadence.target_lag), cadence.timezone).since_last_handled()
    return (
        (tick & changed_since_refresh & ~condition.in_progress() & ~blocked)
        .with_label(f"within its target lag ({cadence.target_lag})")
    )
