"""Run sandbox providers standalone: ``python -m sandbox hedera [--port N]``."""
from __future__ import annotations

import argparse
import time

from sandbox.server import FakeServer


def main() -> None:
    from sandbox import apps

    parser = argparse.ArgumentParser(prog="python -m sandbox")
    parser.add_argument("provider", choices=apps.available())
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = FakeServer(apps.sandbox(args.provider).demo_app(), port=args.port).start()
    print(f"sandbox {args.provider} listening on {server.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
