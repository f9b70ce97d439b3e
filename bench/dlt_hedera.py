"""dlt's rest_api source crawling the fake mirror node into PostgreSQL: B8's comparison.

Run by ``bench/b8_versus.py`` in its own virtualenv (``.venv-bench``, dlt
pinned there), never imported by the project: ``python bench/dlt_hedera.py
BASE_URL QUERY DB_URL``. The same pages as the other two crawls (the
query given, ``links.next`` followed), each balance a row, written by dlt's
postgres destination. Prints the rows loaded.
"""
from __future__ import annotations

import sys
from urllib.parse import parse_qsl

import dlt
from dlt.sources.helpers.rest_client.paginators import JSONLinkPaginator
from dlt.sources.rest_api import rest_api_source


def main() -> None:
    base_url, query, db_url = sys.argv[1:4]
    source = rest_api_source({
        "client": {"base_url": base_url, "paginator": JSONLinkPaginator(next_url_path="links.next")},
        "resources": [{"name": "balances", "endpoint": {
            "path": "api/v1/balances", "params": dict(parse_qsl(query)), "data_selector": "balances"}}],
    })
    pipeline = dlt.pipeline(pipeline_name="b8_hedera", destination=dlt.destinations.postgres(db_url),
                            dataset_name="b8_dlt", progress=None)
    info = pipeline.run(source, write_disposition="replace")
    rows = pipeline.last_trace.last_normalize_info.row_counts
    print(sum(count for table, count in rows.items() if not table.startswith("_dlt")), flush=True)
    info.raise_on_failed_jobs()


if __name__ == "__main__":
    main()
