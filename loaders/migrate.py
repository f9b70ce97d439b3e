"""Applying the Alembic migrations in ``migrations/``."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool

from loaders.db import LOCK_TIMEOUT, connect, sqlalchemy_url



def _migrations() -> Path:
    """``migrations/`` of the source tree, or ``loaders/migrations`` where the wheel installs it."""
    here = Path(__file__).resolve().parent
    for folder in (here / "migrations", here.parent / "migrations"):
        if (folder / "env.py").is_file():
            return folder
    raise FileNotFoundError(f"no migrations beside {here}: the package is installed incompletely")


MIGRATIONS = _migrations()


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # '%' must be doubled for ConfigParser; passwords may contain it.
    config.set_main_option("sqlalchemy.url", migration_url(url).replace("%", "%%"))
    return config


def migration_url(url: str) -> str:
    """The SQLAlchemy URL migrations run with: with a ``lock_timeout``.

    A migration takes ACCESS EXCLUSIVE locks. Behind a dashboard's open
    transaction it would wait without end, and every later reader would
    queue behind it; it gives up after ``lock_timeout`` instead (run it
    again when the readers are idle). Statements get no time limit here:
    rewriting a large table (0006) legitimately takes long.
    """
    options = quote(f"-c lock_timeout={int(LOCK_TIMEOUT.total_seconds() * 1000)}", safe="")
    engine_url = sqlalchemy_url(url)
    return f"{engine_url}{'&' if '?' in engine_url else '?'}options={options}"


def upgrade(url: str, revision: str = "head") -> str:
    """Bring the database to ``revision``; safe to run on an up-to-date database."""
    # Connect once with our own client first: a wrong password or a host
    # that is down is then one clear line, not an SQLAlchemy traceback.
    connect(url).close()
    command.upgrade(alembic_config(url), revision)
    return current_revision(url) or "base"


def current_revision(url: str) -> str | None:
    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config).get_current_head()
