"""Keeps PostgreSQL materialized views fresh, observable and safe, with Dagster.

`analytics_views.MaterializedViewsComponent` is the component a defs.yaml names; it is imported on first use,
so importing the package (or its PostgreSQL and SQL-file layers) does not import Dagster.
"""

__all__ = ["MaterializedViewsComponent"]


def __getattr__(name: str):
    if name == "MaterializedViewsComponent":
        from analytics_views.orchestration.component import MaterializedViewsComponent

        return MaterializedViewsComponent
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    # dg lists a registry module's components by dir(): the lazy one must be listed too.
    return sorted([*globals(), *__all__])
