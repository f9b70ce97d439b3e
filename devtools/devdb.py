"""A private PostgreSQL cluster for the demo and the test suite.

Lives under a project-local data directory, listens on 127.0.0.1 only, and
is started with the PostgreSQL binaries found on the machine. PostgreSQL
refuses to run as root, so as root the cluster belongs to the ``postgres``
OS user.

Every login needs a password, checked with SCRAM-SHA-256, on the socket and
on TCP alike: with ``trust`` any local OS user could log in as superuser,
read Airflow's Connections from its metadata database, and run shell
commands as ``postgres`` (``COPY ... TO PROGRAM``). The superuser's password
is generated when the cluster is made and kept beside the data directory in
``<data dir>.password``, mode 0600, readable only by whoever made it. A
cluster made by an earlier version with ``trust`` is converted on its next
start, its data kept.

``python -m devtools.devdb start|stop|url [DIR]`` drives it by hand (``url``
prints the database URL with its password: keep it to yourself).
"""
from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

DEFAULT_DIR = Path(__file__).resolve().parent.parent / ".pgdata"
DATABASE = "balances"
SUPERUSER = "postgres"
# No trust anywhere: SCRAM on the socket and on loopback TCP, nothing else.
PG_HBA = """\
# Written by devtools/devdb.py: every login is checked with a password.
local   all   all                 scram-sha-256
host    all   all   127.0.0.1/32  scram-sha-256
host    all   all   ::1/128       scram-sha-256
"""


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


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def password_file(data_dir: Path = DEFAULT_DIR) -> Path:
    data_dir = Path(data_dir).resolve()
    return data_dir.with_name(data_dir.name + ".password")


def password(data_dir: Path = DEFAULT_DIR) -> str:
    """The superuser's password of the cluster in ``data_dir``."""
    try:
        return password_file(data_dir).read_text().strip()
    except FileNotFoundError:
        raise DevDbError(f"no password file {password_file(data_dir)}: start the cluster with "
                         "'python -m devtools.devdb start' first") from None


def running_port(data_dir: Path = DEFAULT_DIR) -> int | None:
    """The port of the cluster running in ``data_dir``, or None when it is not running."""
    pid_file = Path(data_dir) / "postmaster.pid"
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


def url_for(port: int, database: str = DATABASE, data_dir: Path = DEFAULT_DIR) -> str:
    return f"postgresql://{SUPERUSER}:{quote(password(data_dir), safe='')}@127.0.0.1:{port}/{database}"


def start(data_dir: Path = DEFAULT_DIR, *, database: str = DATABASE) -> str:
    """Start (initialising if needed) the cluster; return the database URL, password included."""
    data_dir = Path(data_dir).resolve()
    port = running_port(data_dir)
    if port is None:
        bin_dir = binaries()
        if not (data_dir / "PG_VERSION").exists():
            data_dir = _initdb(bin_dir, data_dir)
        elif not password_file(data_dir).exists():
            _convert_trust_cluster(data_dir)
        port = free_port()
        _pg_ctl_start(bin_dir, data_dir, port)
    _create_database(port, database, data_dir)
    return url_for(port, database, data_dir)


def owns(url: str, data_dir: Path = DEFAULT_DIR) -> bool:
    """Whether ``url`` names this cluster's own database (the one :func:`start` returns), running now."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = running_port(Path(data_dir).resolve())
    return (port is not None and parts.port == port and parts.hostname in ("127.0.0.1", "localhost", "::1")
            and parts.path.lstrip("/") == DATABASE)


def recreate(data_dir: Path = DEFAULT_DIR, *, database: str = DATABASE) -> str:
    """Drop the running cluster's ``database`` and the Airflow metadata beside it (``<name>_airflow``), and
    create ``database`` again, empty; return its URL."""
    from psycopg2 import sql

    data_dir = Path(data_dir).resolve()
    port = running_port(data_dir)
    if port is None:
        raise DevDbError(f"the cluster in {data_dir} is not running")
    conn = _superuser(port, data_dir)
    try:
        with conn.cursor() as cur:
            for name in (database + "_airflow", database):
                # FORCE: sessions a stopped run left open (a dashboard, a psql) would keep it otherwise.
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    finally:
        conn.close()
    _create_database(port, database, data_dir)
    return url_for(port, database, data_dir)


def _write_secret(path: Path, text: str) -> None:
    """``text`` into ``path``, created 0600 (never readable by others, not even for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def _reachable_by_postgres(path: Path) -> bool:
    return subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(path)],
                          capture_output=True).returncode == 0


def _place_data_dir(data_dir: Path) -> Path:
    """Where the cluster's files go: ``data_dir``, unless the ``postgres`` user cannot reach it.

    As root in a checkout under ``/root`` (mode 0700), the server, which runs
    as ``postgres``, could not open its own data directory. Its files then
    live in ``/var/lib/postgresql/balances-dev/<id>`` (``postgres``'s own
    home), and ``data_dir`` becomes a link to them: every command here
    resolves it, so nothing else changes.
    """
    if os.geteuid() != 0 or _reachable_by_postgres(data_dir.parent):
        return data_dir
    import hashlib

    home = Path("/var/lib/postgresql/balances-dev")
    home.mkdir(parents=True, exist_ok=True)
    shutil.chown(home, "postgres", "postgres")
    home.chmod(0o700)
    target = home / hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    data_dir.symlink_to(target, target_is_directory=True)
    return target


def _initdb(bin_dir: Path, data_dir: Path) -> Path:
    """A new cluster in ``data_dir`` (or where it links to, see :func:`_place_data_dir`); its real path."""
    data_dir = _place_data_dir(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(data_dir, "postgres", "postgres")
    secret = secrets.token_urlsafe(24)
    # initdb reads the password from a file its OS user can read: a private
    # temporary directory given to that user, removed at once.
    with tempfile.TemporaryDirectory(prefix="devdb-") as tmp:
        pwfile = Path(tmp) / "pw"
        _write_secret(pwfile, secret)
        if os.geteuid() == 0:
            shutil.chown(tmp, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        _run(_as_owner([str(bin_dir / "initdb"), "-D", str(data_dir), "-U", SUPERUSER, "-E", "UTF8",
                        "--no-locale", "--auth-local=scram-sha-256", "--auth-host=scram-sha-256",
                        f"--pwfile={pwfile}"]), "initdb")
    _write_hba(data_dir)
    _write_secret(password_file(data_dir), secret)
    return data_dir


def _write_hba(data_dir: Path) -> None:
    hba = data_dir / "pg_hba.conf"
    hba.write_text(PG_HBA)
    if os.geteuid() == 0:
        shutil.chown(hba, "postgres", "postgres")


def _convert_trust_cluster(data_dir: Path) -> None:
    """A cluster made with ``trust`` (before passwords): give the superuser one, then require it.

    Started once on a private socket only (no TCP), the password set over
    it, then ``pg_hba.conf`` replaced; the caller starts it for real.
    """
    bin_dir = binaries()
    port = free_port()
    _run(_as_owner([str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-o",
                    f"-p {port} -k {data_dir} -c listen_addresses=''", "-l", str(data_dir / "server.log"),
                    "-w", "-t", "60", "start"]), "pg_ctl start (to set a password)")
    secret = secrets.token_urlsafe(24)
    try:
        import psycopg2

        conn = psycopg2.connect(host=str(data_dir), port=port, user=SUPERUSER, dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SET password_encryption = 'scram-sha-256'")
            cur.execute(f"ALTER ROLE {SUPERUSER} PASSWORD %s", (secret,))
        conn.close()
        _write_hba(data_dir)
        _write_secret(password_file(data_dir), secret)
    finally:
        _run(_as_owner([str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w", "stop"]), "pg_ctl stop")


def _pg_ctl_start(bin_dir: Path, data_dir: Path, port: int) -> None:
    options = (f"-p {port} -k {data_dir} -c listen_addresses=127.0.0.1 -c fsync=off "
               "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100 "
               "-c password_encryption=scram-sha-256")
    _run(_as_owner([str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-o", options, "-l",
                    str(data_dir / "server.log"), "-w", "-t", "60", "start"]), "pg_ctl start")


def stop(data_dir: Path = DEFAULT_DIR) -> bool:
    """Stop the cluster if it runs; whether it did."""
    data_dir = Path(data_dir).resolve()
    if running_port(data_dir) is None:
        return False
    _run(_as_owner([str(binaries() / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w", "-t", "180", "stop"]),
         "pg_ctl stop")
    return True


def restart(data_dir: Path = DEFAULT_DIR) -> None:
    """Restart the server on the same port as a crash would: every client connection is cut,
    transactions in flight are lost, UNLOGGED tables come back empty."""
    data_dir = Path(data_dir).resolve()
    port = running_port(data_dir)
    if port is not None:
        # A checkpoint first keeps the crash recovery short (it loses nothing a
        # crash would lose): replaying a whole test session's WAL took over a
        # minute on a busy 2-core machine.
        conn = _superuser(port, data_dir)
        try:
            with conn.cursor() as cur:
                cur.execute("CHECKPOINT")
        finally:
            conn.close()
    # -l matters: without it the server inherits our pipes and the call never returns.
    _run(_as_owner([str(binaries() / "pg_ctl"), "-D", str(data_dir), "-m", "immediate", "-l",
                    str(data_dir / "server.log"), "-w", "-t", "180", "restart"]), "pg_ctl restart")


def _superuser(port: int, data_dir: Path, wait: float = 30):
    """An autocommit superuser session in the ``postgres`` database, waiting up to ``wait`` s for the server."""
    import psycopg2

    deadline = time.monotonic() + wait
    while True:
        try:
            conn = psycopg2.connect(host="127.0.0.1", port=port, user=SUPERUSER, dbname="postgres",
                                    password=password(data_dir))
            break
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    conn.autocommit = True
    return conn


def _create_database(port: int, database: str, data_dir: Path) -> None:
    from psycopg2 import sql

    conn = _superuser(port, data_dir)
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
        print("stopped" if stop(directory) else "not running")
    elif action == "url":
        port = running_port(directory)
        if port is None:
            sys.exit(f"no cluster runs in {directory}")
        print(url_for(port, DATABASE, directory))
    else:
        sys.exit("usage: python -m devtools.devdb start|stop|url [DIR]")
