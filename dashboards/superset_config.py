"""Superset settings for the local dashboard (``balances demo --serve`` and the browser test).

Everything comes from the environment that devtools/superset.py sets:
the metadata database (SQLite in the run's work directory) and the secret
key, generated once per work directory and kept beside it.
"""
import os

SECRET_KEY = os.environ["SUPERSET_SECRET_KEY"]
SQLALCHEMY_DATABASE_URI = os.environ["SUPERSET_METADATA_URL"]
# Examples and their loaders stay out of a dashboard-only instance.
SUPERSET_LOAD_EXAMPLES = False
TALISMAN_ENABLED = False
WTF_CSRF_ENABLED = True
# The dashboard refreshes every minute, like the sources it shows.
SUPERSET_WEBSERVER_TIMEOUT = 120
FEATURE_FLAGS = {"DASHBOARD_NATIVE_FILTERS": True}
