"""The ``balances`` command: the parser and exit statuses (:mod:`cli.main`), what each subcommand
does (:mod:`cli.commands`), how values reach a terminal (:mod:`cli.terminal`).

It sits above every other layer, as ``dags/`` does: it wires the run (``pipeline``) and the
reconciliation (``reconciliation``) together, and nothing of production imports it.
"""
