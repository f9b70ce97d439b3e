"""Extractors: read balance snapshots from provider APIs, one page at a time.

Each provider module declares only what differs (paths, paginator, record
parser); the HTTP machinery, retries, paginators and stop rules are shared.
"""
