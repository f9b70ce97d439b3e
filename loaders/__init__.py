"""Loaders: the PostgreSQL side only — runs, staging, publishing, partitions.

Nothing here knows about HTTP or providers; it receives rows and counts.
"""
