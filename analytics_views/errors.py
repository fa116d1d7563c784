class AnalyticsViewsError(Exception):
    """An expected failure: its message is one line naming the problem and the fix, shown without a traceback."""
