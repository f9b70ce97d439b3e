"""B8: ``balances snapshot`` against a bare crawl and against dlt, on the same pages, in one run.

One fake mirror node (another process, every page rendered up front, so the
clients are measured and not the fake) serves N accounts, one in seven
holding two tokens. Three clients read the same pages, each in a fresh
process, one after the other:

* **bare**: ``requests`` + ``json``, following ``links.next``, keeping
  nothing: the floor any crawler pays;
* **ours**: ``balances snapshot`` as a user types it: the snapshot chosen,
  every page parsed into exact rows, checked, staged with COPY and
  published into the history in one transaction;
* **dlt**: dlt's ``rest_api`` source into its postgres destination
  (``bench/dlt_hedera.py``, in ``.venv-bench`` with dlt pinned; installed
  on first use).

Ours runs in the three cases a schedule meets: into an empty history, where
the snapshot is the **first of its month** and is stored whole (the
month's keyframe: once a month per source), and as the **next snapshot**,
with the month's first (a day earlier, from a second fake) already
published, where only the holdings that moved are stored (every other
run: 2,879 of 2,880 at 15-minute snapshots); and that next snapshot
**once more**, as a schedule that fires more often than the provider takes
snapshots chooses the same one again (nothing stored). The snapshot read
is the same in all three: one account in a hundred moved since the
earlier one.

Wall time and peak resident memory of each process (``wait4``). Targets:
ours <= 1.3x bare, >= 4x faster than dlt, peak RSS flat and <= 100 MB.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.db import bench_database, reset
from bench.servers import SNAPSHOT_TS, MirrorProcess
from loaders.db import connect

REPO = Path(__file__).resolve().parent.parent
BENCH_VENV = REPO / ".venv-bench"
DLT = "dlt[postgres]==1.31.0"
QUERY = f"limit=100&timestamp=lte:{SNAPSHOT_TS}"
AT = "2023-11-14T22:15:00+00:00"  # after the fake's snapshot
TOKENS_EVERY = 7
# The month's first snapshot, a day before the measured one, for the "next snapshot" case.
EARLIER_TS = "1699913600.000000000"
EARLIER_QUERY = f"limit=100&timestamp=lte:{EARLIER_TS}"
EARLIER_AT = "2023-11-13T22:15:00+00:00"
MOVED_EVERY = 100  # accounts whose balance moved between the two: 1%

BARE = """
import json, sys, requests
base, query = sys.argv[1:3]
session = requests.Session()
url, pages, rows = f"{base}/api/v1/balances?{query}", 0, 0
while url:
    body = json.loads(session.get(url, timeout=60).content)
    pages += 1
    rows += sum(1 + len(b["tokens"]) for b in body["balances"])
    link = body["links"]["next"]
    url = base + link if link else None
print(rows)
"""


def bench_venv() -> Path:
    """``.venv-bench`` with dlt, made once (and again when the pin changes)."""
    stamp = BENCH_VENV / ".installed"
    if not stamp.exists() or stamp.read_text() != DLT:
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run([str(BENCH_VENV / "bin" / "pip"), "install", "-q", DLT], check=True)
        stamp.write_text(DLT)
    return BENCH_VENV / "bin" / "python"


def run_one(argv: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB, the child's own rusage) and standard output of one process."""
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child becomes the measured process
        try:
            os.chdir(REPO)
            with open(os.devnull, "rb") as devnull:
                os.dup2(devnull.fileno(), 0)
            out = os.open(OUT, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(out, 1)
            err = os.open(ERR, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(err, 2)
            os.execvpe(argv[0], argv, env or os.environ)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed: {Path(ERR).read_text()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024, Path(OUT).read_text()


_TMP = Path(tempfile.mkdtemp(prefix="b8-"))
OUT, ERR = str(_TMP / "out"), str(_TMP / "err")


def ours(url: str, db_url: str, at: str = AT) -> tuple[float, float, int]:
    config = _TMP / "sources.toml"
    config.write_text(f'[sources.b8_hedera]\nprovider = "hedera"\nbase_url = "{url}"\nlimit = 100\n'
                      'include_tokens = true\nmax_pages = 1000000\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "BALANCES_"))}
    # The console script's directory, not the checkout, is first on its path: name the checkout, so a
    # worktree sharing another checkout's venv (an editable install) measures its own code.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    seconds, rss, out = run_one([str(REPO / ".venv" / "bin" / "balances"), "--quiet", "--config", str(config),
                                 "--db-url", db_url, "snapshot", "b8_hedera", "--at", at], env)
    rows = int(next(line.split(":")[1] for line in out.splitlines() if line.strip().startswith("rows:")))
    return seconds, rss, rows


def stored(db_url: str) -> list[tuple[bool, int, int]]:
    """(keyframe, holdings, rows stored) of each published snapshot, oldest first."""
    conn = connect(db_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT keyframe, holdings, stored FROM balance_snapshots ORDER BY as_of")
            return cur.fetchall()
    finally:
        conn.close()


def run(sizes: tuple[int, ...] = (200_000, 1_000_000), rounds: tuple[int, ...] = (7, 3)) -> dict:
    """Each size: ``rounds`` of bare then ours in each case, one after the other, then dlt once; medians.

    One round of each is not enough on a shared machine: the bare loop, which
    waits on the fake most, moves by a third from one run to the next. The
    figures are the medians of the rounds, and the median of each round's
    ratio (the runs compared are seconds apart, so they share the load).
    """
    python_dlt = bench_venv()
    db_url = bench_database()
    results = []
    for accounts, times in zip(sizes, rounds):
        bare, first, bare_next, following, bare_again, again = [], [], [], [], [], []
        with MirrorProcess(accounts, tokens_every=TOKENS_EVERY, prerender_query=QUERY,
                           moved_every=MOVED_EVERY) as url, \
             MirrorProcess(accounts, tokens_every=TOKENS_EVERY, prerender_query=EARLIER_QUERY,
                           snapshot_ts=EARLIER_TS) as earlier_url:
            run_one([sys.executable, "-c", BARE, url, QUERY])  # warm the fake and the page cache
            for _ in range(times):
                bare.append(run_one([sys.executable, "-c", BARE, url, QUERY]))
                reset(db_url)
                first.append(ours(url, db_url))
                assert [k for k, _, _ in stored(db_url)] == [True], "the first snapshot was not a keyframe"
                reset(db_url)
                ours(earlier_url, db_url, EARLIER_AT)  # the month's first, not timed
                bare_next.append(run_one([sys.executable, "-c", BARE, url, QUERY]))
                following.append(ours(url, db_url))
                (_, earlier, _), (keyframe, holdings, rows_stored) = stored(db_url)
                # Stored as changes: exactly the moved accounts' rows.
                assert not keyframe and holdings == earlier and rows_stored == accounts // MOVED_EVERY, \
                    (keyframe, holdings, earlier, rows_stored)
                bare_again.append(run_one([sys.executable, "-c", BARE, url, QUERY]))
                again.append(ours(url, db_url))
                assert stored(db_url) == [(True, earlier, earlier), (False, holdings, rows_stored)], \
                    "the same snapshot again stored something"
            dlt_s, dlt_mb, dlt_out = run_one([str(python_dlt), str(REPO / "bench" / "dlt_hedera.py"), url,
                                              QUERY, db_url])
        rows = int(bare[0][2].strip())
        assert all(int(out.strip()) == rows for _, _, out in bare + bare_next + bare_again), \
            "the bare loop counted differently"
        ours_rows = [r for _, _, r in first + following + again]
        assert all(r == rows for r in ours_rows) and rows == int(dlt_out.strip().splitlines()[-1]), \
            (rows, ours_rows, dlt_out[-200:])
        # The first snapshot of a month keeps the figures' first names (earlier results use them).
        results.append({"accounts": accounts, "rows": rows, "rounds": times, **_case(bare, first),
                        "dlt_s": round(dlt_s, 2),
                        "dlt_vs_ours": round(dlt_s / statistics.median(s for s, _, _ in first), 2),
                        "bare_mb": round(max(mb for _, mb, _ in bare)), "dlt_mb": round(dlt_mb),
                        "next": {**_case(bare_next, following), "rows_stored": accounts // MOVED_EVERY,
                                 "dlt_vs_ours": round(dlt_s / statistics.median(s for s, _, _ in following), 2)},
                        "again": {**_case(bare_again, again), "rows_stored": 0}})
    return {"benchmark": "B8 versus a bare crawl and dlt", "results": results,
            "cases": {"ours_*": "the first snapshot of its month (stored whole, the month's keyframe)",
                      "next": "the next snapshot of the month (stored as changes: 1% of accounts moved)",
                      "again": "the next snapshot once more (a rerun: the provider's snapshot already held)"},
            "targets": {"ours_vs_bare": "<= 1.3", "dlt_vs_ours": ">= 4", "ours_mb": "<= 100, flat"}}


def _case(bare_runs: list, ours_runs: list) -> dict:
    """Medians, the median of the rounds' ratios (ours over bare), every run, ours' peak RSS."""
    return {"bare_s": round(statistics.median(s for s, _, _ in bare_runs), 2),
            "ours_s": round(statistics.median(s for s, _, _ in ours_runs), 2),
            "ours_vs_bare": round(statistics.median(o[0] / b[0] for o, b in zip(ours_runs, bare_runs)), 2),
            "bare_runs_s": [round(s, 2) for s, _, _ in bare_runs],
            "ours_runs_s": [round(s, 2) for s, _, _ in ours_runs],
            "ours_mb": round(max(mb for _, mb, _ in ours_runs))}
