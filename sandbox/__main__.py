"""Run a sandbox provider on its own: ``python -m sandbox hedera [--port N]``.

Prints its URL, the ``[sources.<name>]`` table that reads it, and for a
provider with credentials the ``AIRFLOW_CONN_...`` to set (the sandbox's
own, fixed test credentials); serves until Ctrl-C.
"""
from __future__ import annotations

import argparse
import shlex
import time

from sandbox.server import FakeServer


def main() -> None:
    from sandbox import apps

    parser = argparse.ArgumentParser(prog="python -m sandbox")
    parser.add_argument("provider", choices=apps.available())
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    module = apps.sandbox(args.provider)
    server = FakeServer(module.demo_app(), port=args.port).start()
    print(f"sandbox {args.provider} listening on {server.url}\n", flush=True)
    print(apps.sources_text({f"{args.provider}_sandbox": module.demo_source(server.url)}), flush=True)
    if module.DEMO_CONNECTION:
        conn_id, uri = module.DEMO_CONNECTION
        print(f"\nexport AIRFLOW_CONN_{conn_id.upper()}={shlex.quote(uri)}", flush=True)
    print("\nCtrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
