"""Reconciliation: checks over the published history, their runs, reports and alerts."""
