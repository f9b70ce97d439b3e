"""A local Apache Superset serving the "Balances" dashboard (``dashboards/``).

Superset lives in its own virtualenv (``scripts/superset`` installs it;
its pins conflict with Airflow's). :meth:`SupersetServer.start` prepares a
work directory (SQLite metadata, an admin login, ``superset init``), gives
the dashboard a PostgreSQL login in ``balances_reader`` (it reads the
views and nothing else), imports the dashboard and serves it on 127.0.0.1.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
VENV_ENV = "SUPERSET_VENV"  # where scripts/superset installs it (default .venv-superset)
READER = "balances_dashboard"


def venv() -> Path:
    """Superset's virtualenv: ``$SUPERSET_VENV`` (e.g. a cache outside a CI checkout) or ``.venv-superset``."""
    return Path(os.environ.get(VENV_ENV) or REPO / ".venv-superset").resolve()


class SupersetError(RuntimeError):
    """Superset could not be prepared or started; one line says why."""


def reader_url(db_url: str, login: str = READER) -> str:
    """(Re)create ``login`` as ``balances reader create`` does (limits included); its URL."""
    from loaders.db import connect
    from loaders.readers import create_reader

    conn = connect(db_url)
    try:
        password = create_reader(conn, login, replace=True)
    finally:
        conn.close()
    parts = urlsplit(db_url)
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit(("postgresql", f"{login}:{password}@{host}", parts.path, "", ""))


def dashboards_build():
    """``dashboards/build.py`` (a script beside the export, not an installed package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("balances_dashboards_build", REPO / "dashboards" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class SupersetServer:
    url: str
    login: str
    password: str
    process: subprocess.Popen
    # The environment its commands run in (its config, metadata and home): what
    # `superset ...` needs to act on this Superset, as an operator's shell has it.
    env: dict[str, str] = field(default_factory=dict)
    dashboard_path: str = "/superset/dashboard/balances/"

    @classmethod
    def start(cls, venv: Path, workdir: Path, db_url: str, *, port: int | None = None,
              timeout: float = 300, dashboard: bool = True) -> "SupersetServer":
        """Prepare ``workdir``, import the dashboard reading ``db_url``'s views (unless not ``dashboard``),
        serve; ready when it returns."""
        import requests

        from devtools.devdb import free_port

        build = dashboards_build()
        workdir.mkdir(parents=True, exist_ok=True)
        key_file = workdir / "secret_key"
        if not key_file.exists():
            key_file.write_text(secrets.token_urlsafe(42))
            key_file.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "BALANCES_"))}
        env.update({"SUPERSET_CONFIG_PATH": str(REPO / "dashboards" / "superset_config.py"),
                    "SUPERSET_SECRET_KEY": key_file.read_text().strip(),
                    "SUPERSET_METADATA_URL": f"sqlite:///{workdir / 'superset.db'}",
                    "SUPERSET_HOME": str(workdir), "FLASK_APP": "superset"})
        log = workdir / "superset.log"
        superset = str(venv / "bin" / "superset")
        password = secrets.token_urlsafe(12)

        def run(*args: str, check: bool = True) -> int:
            with open(log, "ab") as out:
                code = subprocess.run([superset, *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, timeout=600).returncode
            if check and code != 0:
                raise SupersetError(f"superset {args[0]} failed (exit {code}); see {log}")
            return code

        run("db", "upgrade")
        if run("fab", "create-admin", "--username", "admin", "--firstname", "Balances", "--lastname", "Admin",
               "--email", "admin@localhost", "--password", password, check=False) != 0 or \
                "already exist" in log.read_text(errors="replace")[-2000:]:
            run("fab", "reset-password", "--username", "admin", "--password", password)
        run("init")
        if dashboard:
            zipped = build.bundle(reader_url(db_url), workdir / "balances_dashboard.zip")
            run("import-dashboards", "-p", str(zipped), "-u", "admin")
        port = port or free_port()
        with open(log, "ab") as out:
            process = subprocess.Popen([superset, "run", "-h", "127.0.0.1", "-p", str(port), "--with-threads"],
                                       env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        server = cls(url=f"http://127.0.0.1:{port}", login="admin", password=password, process=process, env=env)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if process.poll() is not None:
                    raise SupersetError(f"superset run exited at start; see {log}")
                try:
                    if requests.get(f"{server.url}/health", timeout=5).ok:
                        return server
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    raise SupersetError(f"Superset did not answer within {timeout:.0f}s; see {log}")
                time.sleep(1)
        except BaseException:  # Ctrl-C included: never leave the server behind
            server.stop()
            raise

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except (ProcessLookupError, PermissionError):
                return
            try:
                self.process.wait(timeout=20)
                return
            except subprocess.TimeoutExpired:
                continue
