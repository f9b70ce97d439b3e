"""Sandbox providers: faithful fakes of the four balance APIs, and a real EVM node.

They are real HTTP servers on 127.0.0.1, used by the test suite and by the
README's demo, and answer as the providers' documents in
``shared/reference`` say — traps included (default sort order, silent limit
caps, HTTP 200 errors, omitted cursor fields, ...). The EVM sandbox fakes no
chain: it runs Foundry's anvil (installed by ``scripts/bootstrap`` with npm)
behind a gateway that behaves as hosted JSON-RPC endpoints do (API key, rate
limits, batches answered out of order). ``python -m sandbox`` runs them
standalone.
"""
