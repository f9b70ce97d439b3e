"""Sandbox providers: faithful fakes of the four balance APIs.

They are real HTTP servers on 127.0.0.1, used by the test suite and by the
README's demo, and answer as the providers' documents in
``shared/reference`` say — traps included (default sort order, silent limit
caps, HTTP 200 errors, omitted cursor fields, ...). ``python -m sandbox``
runs them standalone.
"""
