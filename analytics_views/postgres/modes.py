"""How a view is refreshed: the strategy its SQL file asks for (`-- Refresh:`) and the mode a refresh used (its
materialization's `analytics_views/refresh_mode`). Each member is the text it is written as, and equal to it."""

from enum import StrEnum


class RefreshStrategy(StrEnum):
    """What a view's `-- Refresh:` header asks for (swap.py)."""

    AUTO = "auto"  # build-and-swap from swap.SWAP_MIN_ROWS rows, where it may; CONCURRENTLY otherwise
    CONCURRENT = "concurrent"
    SWAP = "swap"

    @classmethod
    def named(cls, text: str) -> "RefreshStrategy":
        """The strategy `text` names; anything else is a ValueError listing the strategies."""
        if text not in list(cls):
            raise ValueError(f"refresh strategy {text!r} is not one of {', '.join(cls)}")
        return cls(text)


class RefreshMode(StrEnum):
    """What a refresh did (refresh.py)."""

    CONCURRENT = "concurrent"
    SWAP = "swap"
    INITIAL_PLAIN = "plain (first population)"  # CONCURRENTLY is refused on a view never populated
    SKIPPED = "skipped (sources unchanged)"
