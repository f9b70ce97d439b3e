"""Development-only tools: the demo, a private PostgreSQL cluster, local Airflow services, Superset.

No module that production loads (dags/, extractors/, loaders/, pipeline/,
reconciliation/) imports this package; only the CLI's `demo` and `serve`
commands load it, when they are run (tests/test_layout.py holds this).
"""
