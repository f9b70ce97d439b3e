"""``scripts/demo``: ``python -m devtools [--db-url URL] [--serve [--alerts-smtp HOST:PORT] | --keep | --stop]``.

Development only, like everything in ``devtools/``: the wheel does not ship it.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/demo",
        description="Run every sandbox provider through its Airflow DAG, reconcile, report, and hand over.")
    parser.add_argument("--db-url", metavar="URL",
                        help="use this database instead of the private cluster in .pgdata ($BALANCES_DB_URL too)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--serve", action="store_true",
                      help="then the real Airflow services (and Superset) over moving sandboxes, until Ctrl-C")
    mode.add_argument("--keep", action="store_true",
                      help="keep the sandboxes serving after the demo, until Ctrl-C")
    mode.add_argument("--stop", action="store_true", help="stop the demo's PostgreSQL cluster")
    parser.add_argument("--alerts-smtp", metavar="HOST:PORT",
                        help="with --serve: mail the incidents' alerts through this SMTP server, without TLS or "
                             "a login (a local capture: .venv/bin/python -m aiosmtpd -n -l 127.0.0.1:8025)")
    args = parser.parse_args(argv)
    if args.alerts_smtp is not None and not args.serve:
        parser.error("--alerts-smtp goes with --serve")
    try:
        return _run(args)
    except Exception as exc:  # what failed, in one line; everything started is already stopped
        from extractors.text import one_line

        print(f"scripts/demo: {type(exc).__name__}: {one_line(' '.join(str(exc).split()))}", file=sys.stderr)
        return 1


def _run(args) -> int:
    if args.stop:
        from devtools.demo import stop_all

        return stop_all()
    if args.serve:
        from devtools.serve import run_serve

        return run_serve(db_url=args.db_url, alerts_smtp=args.alerts_smtp)
    from devtools.demo import run_demo

    return run_demo(db_url=args.db_url, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
