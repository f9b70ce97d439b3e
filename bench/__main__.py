"""Run the benchmarks: ``python -m bench [b1 ... b8] [--quick]``.

Results print as JSON lines and are saved in bench/results/<name>.json.
``--quick`` runs smaller sizes (a smoke test, not the published figures).
``python -m bench celery`` (only when named) proves the sharded crawl on
Airflow's CeleryExecutor with two workers (``bench/celery_scaleout.py``):
it prints its figures and exits non-zero when a proof fails.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from bench import (b1_load, b2_extract, b3_end_to_end, b4_shards, b5_storage, b6_movements, b7_formance_memory,
                   b8_versus)

FULL = {
    "b1": lambda: b1_load.run(1_000_000, 20_000),
    "b2": lambda: b2_extract.run(200_000),
    "b3": lambda: b3_end_to_end.run((100_000, 1_000_000)),
    "b4": lambda: b4_shards.run(40_000),
    "b5": lambda: b5_storage.run_all(),
    "b6": lambda: b6_movements.run((100_000, 1_000_000), 1_000_000),
    "b7": lambda: b7_formance_memory.run((1_000_000, 10_000_000)),
    "b8": lambda: b8_versus.run((200_000, 1_000_000)),
}
QUICK = {
    "b1": lambda: b1_load.run(50_000, 2_000),
    "b2": lambda: b2_extract.run(20_000),
    "b3": lambda: b3_end_to_end.run((10_000, 20_000)),
    "b4": lambda: b4_shards.run(8_000),
    "b5": lambda: b5_storage.run_all(quick=True),
    "b6": lambda: b6_movements.run((10_000, 40_000), 50_000),
    "b7": lambda: b7_formance_memory.run((20_000, 200_000)),
    "b8": lambda: b8_versus.run((10_000, 40_000), (2, 2)),
}


def _celery(quick: bool) -> dict:
    from bench import celery_scaleout

    return celery_scaleout.run(celery_scaleout.Settings(accounts=3000) if quick else celery_scaleout.Settings())


# Run only when named: they start whole deployments and prove rather than time.
OPT_IN = {"celery": _celery}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("names", nargs="*", default=list(FULL),
                        help="b1 ... b8 (default: all), or celery (only when named)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    unknown = set(args.names) - set(FULL) - set(OPT_IN)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    logging.basicConfig(level=logging.WARNING)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    failed = False
    for name in args.names:
        if name in OPT_IN:
            result = OPT_IN[name](args.quick)
            print(json.dumps(result, default=str), flush=True)
            if not args.quick:
                (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
            failed |= not result["ok"]
            continue
        result = (QUICK if args.quick else FULL)[name]()
        print(json.dumps(result), flush=True)
        if not args.quick:
            (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
