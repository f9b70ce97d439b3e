"""Configuration and the run: sources file, connections, the snapshot lifecycle, Airflow task adapters, the CLI."""
