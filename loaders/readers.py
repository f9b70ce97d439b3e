"""Dashboard logins: members of ``balances_reader`` that cannot starve the pipeline.

A login in the group role ``balances_reader`` reads the views and nothing
else (migration 0004). Left without limits, one such login made a 460 MB
temporary table in a second and opened 94 sessions, and then the pipeline's
own login was refused ("remaining connection slots are reserved"). Role
settings are not inherited through membership, so each login is made here
with its own:

* ``CONNECTION LIMIT`` (default 10), and the sum over every reader login
  kept below ``max_connections`` minus the superuser slots minus a reserve
  for the pipeline (default 20): a new login that would eat into it is
  refused;
* ``temp_file_limit`` (default 1 GB): only a superuser can change it, so the
  login cannot lift it;
* ``statement_timeout`` and ``idle_in_transaction_session_timeout``
  (default 60 s each): the login's defaults. PostgreSQL lets a session SET
  them itself; BI tools do not, and a session that does still meets the two
  limits above.

Setting ``temp_file_limit`` on a role takes a superuser, or on PostgreSQL 15
and later a login granted ``SET`` on it (``GRANT SET ON PARAMETER
temp_file_limit TO <pipeline login>``).
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from psycopg2 import errors, sql

from loaders.db import DatabaseError, transaction

READER_GROUP = "balances_reader"
# Role names a user types: the same rule as source names, so nothing needs quoting anywhere.
_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
DEFAULT_RESERVE = 20
# Whether a role is a reader login (a superuser is a member of every role, and is none).
_IS_READER = ("SELECT rolcanlogin AND NOT rolsuper AND pg_has_role(oid, %s, 'member')"
              " FROM pg_roles WHERE rolname = %s")


@dataclass(frozen=True, slots=True)
class ReaderLimits:
    connections: int = 10
    statement_timeout: int = 60  # seconds
    temp_file_limit: str = "1GB"
    idle_in_transaction_timeout: int = 60  # seconds

    def settings(self) -> dict[str, str]:
        return {"statement_timeout": f"{self.statement_timeout}s",
                "idle_in_transaction_session_timeout": f"{self.idle_in_transaction_timeout}s",
                "temp_file_limit": self.temp_file_limit}


class ReaderError(DatabaseError):
    """A reader login cannot be made or dropped as asked; one line says why."""


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ReaderError(f"reader name {name!r}: 1 to 63 lowercase ASCII letters, digits and _, starting "
                          "with a letter")
    return name


def connection_budget(cur) -> tuple[int, list[tuple[str, int]]]:
    """Connections reader logins may hold in all, and each reader login's limit (-1: none)."""
    cur.execute("SELECT current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int"
                " - coalesce(current_setting('reserved_connections', true)::int, 0)")
    usable = cur.fetchone()[0]
    cur.execute("""SELECT r.rolname, r.rolconnlimit FROM pg_roles r
                    WHERE r.rolcanlogin AND NOT r.rolsuper AND pg_has_role(r.oid, %s, 'member') AND r.rolname <> %s
                    ORDER BY r.rolname""", (READER_GROUP, READER_GROUP))
    return usable, cur.fetchall()


def create_reader(conn, name: str, limits: ReaderLimits = ReaderLimits(), *,
                  reserve: int = DEFAULT_RESERVE, replace: bool = False) -> str:
    """Create the login ``name`` in ``balances_reader`` with ``limits``; its generated password.

    ``replace`` drops an existing reader login of that name first (its
    sessions keep running until they end). Refused, with nothing changed,
    when the readers' connections would leave fewer than ``reserve`` for the
    pipeline, or ``name`` is a role that is not a reader login.
    """
    check_name(name)
    password = secrets.token_urlsafe(24)
    with transaction(conn) as cur:
        cur.execute(_IS_READER,
                    (READER_GROUP, name))
        found = cur.fetchone()
        if found is not None and not (replace and found[0]):
            raise ReaderError(f"role {name!r} exists already" + ("" if found[0] else " and is not a reader login")
                              + ("; 'balances reader drop' it first" if found[0] else ""))
        usable, readers = connection_budget(cur)
        others = [(role, limit) for role, limit in readers if role != name]
        unlimited = [role for role, limit in others if limit < 0]
        if unlimited:
            raise ReaderError(f"reader login(s) {', '.join(unlimited)} have no connection limit, so no connection is "
                              "sure to be left for the pipeline: recreate them with 'balances reader create', or "
                              "ALTER ROLE ... CONNECTION LIMIT n")
        taken = sum(limit for _, limit in others) + limits.connections
        if taken > usable - reserve:
            raise ReaderError(f"reader logins would hold {taken} of the {usable} connections, leaving fewer than "
                              f"{reserve} for the pipeline: give this one fewer (--connections) or drop another")
        role = sql.Identifier(name)
        if found is not None:
            cur.execute(sql.SQL("DROP ROLE {}").format(role))
        cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s CONNECTION LIMIT %s IN ROLE {}").format(
            role, sql.Identifier(READER_GROUP)), (password, limits.connections))
        for setting, value in limits.settings().items():
            try:
                cur.execute(sql.SQL("ALTER ROLE {} SET {} = %s").format(role, sql.Identifier(setting)), (value,))
            except errors.InsufficientPrivilege:
                raise ReaderError(f"this login may not set {setting} on a role: run as a superuser, or GRANT SET "
                                  f"ON PARAMETER {setting} TO it (PostgreSQL 15+); nothing was created") from None
    return password


def drop_reader(conn, name: str) -> None:
    """Drop the reader login ``name``; refused for any other role."""
    check_name(name)
    with transaction(conn) as cur:
        cur.execute(_IS_READER,
                    (READER_GROUP, name))
        found = cur.fetchone()
        if found is None:
            raise ReaderError(f"no role {name!r}")
        if not found[0] or name == READER_GROUP:
            raise ReaderError(f"role {name!r} is not a reader login: not dropped")
        cur.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
