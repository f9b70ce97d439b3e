"""A private PostgreSQL cluster for the demo and the test suite.

Lives under a project-local data directory, listens on 127.0.0.1 only, and
is started with the PostgreSQL binaries found on the machine. PostgreSQL
refuses to run as root, so as root the cluster belongs to the ``postgres``
OS user. ``python -m devtools.devdb start|stop|url`` drives it by hand.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent.parent / ".pgdata"
DATABASE = "balances"


class DevDbError(RuntimeError):
    pass


def binaries() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    for path in reversed(candidates):
        if os.path.exists(os.path.join(path, "pg_ctl")):
            return Path(path)
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    raise DevDbError("PostgreSQL server binaries not found (apt-get install -y postgresql)")


def _as_owner(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--"] + cmd
    return cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _running_port(data_dir: Path) -> int | None:
    pid_file = data_dir / "postmaster.pid"
    if not pid_file.exists():
        return None
    lines = pid_file.read_text().splitlines()
    try:
        pid, port = int(lines[0]), int(lines[3])
    except (IndexError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return port


def url_for(port: int, database: str = DATABASE) -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/{database}"


def start(data_dir: Path = DEFAULT_DIR, *, database: str = DATABASE, quiet: bool = True) -> str:
    """Start (initialising if needed) the cluster; return the database URL."""
    data_dir = Path(data_dir).resolve()
    port = _running_port(data_dir)
    if port is None:
        bin_dir = binaries()
        if not (data_dir / "PG_VERSION").exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(data_dir, "postgres", "postgres")
            _run(_as_owner([str(bin_dir / "initdb"), "-D", str(data_dir), "-A", "trust", "-U", "postgres",
                            "-E", "UTF8", "--no-locale"]), "initdb")
        port = _free_port()
        options = (f"-p {port} -k {data_dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        _run(_as_owner([str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-o", options, "-l",
                        str(data_dir / "server.log"), "-w", "-t", "60", "start"]), "pg_ctl start")
    _create_database(port, database)
    return url_for(port, database)


def stop(data_dir: Path = DEFAULT_DIR) -> None:
    data_dir = Path(data_dir).resolve()
    if _running_port(data_dir) is None:
        return
    _run(_as_owner([str(binaries() / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w", "stop"]), "pg_ctl stop")


def restart(data_dir: Path = DEFAULT_DIR) -> None:
    """Restart the server on the same port (every client connection is cut)."""
    data_dir = Path(data_dir).resolve()
    # -l matters: without it the server inherits our pipes and the call never returns.
    _run(_as_owner([str(binaries() / "pg_ctl"), "-D", str(data_dir), "-m", "immediate", "-l",
                    str(data_dir / "server.log"), "-w", "-t", "60", "restart"]), "pg_ctl restart")


def _create_database(port: int, database: str) -> None:
    import psycopg2
    from psycopg2 import sql

    deadline = time.monotonic() + 30
    while True:
        try:
            conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
            break
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
        if cur.fetchone() is None:
            create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database))
            # Like most production databases, with a linguistic default
            # collation (the cluster itself is C): the tests then prove
            # that nothing relies on the server's default order.
            cur.execute("SELECT current_setting('server_version_num')::int >= 150000"
                        " AND EXISTS (SELECT FROM pg_collation WHERE collprovider = 'i')")
            if cur.fetchone()[0]:
                create += sql.SQL(" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'")
            cur.execute(create)
    conn.close()


def _run(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise DevDbError(f"{what} failed: {(result.stderr or result.stdout).strip()}")


if __name__ == "__main__":
    action = sys.argv[1] if len(sys.argv) > 1 else "start"
    directory = Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_DIR
    if action == "start":
        print(start(directory))
    elif action == "stop":
        stop(directory)
    else:
        sys.exit("usage: python -m devtools.devdb start|stop [DIR]")
