"""The demo data set of each sandbox provider, as ready-to-serve apps."""
from __future__ import annotations

import time

from sandbox import hedera


def hedera_demo():
    return hedera.demo_mirror(int(time.time()))


DEMO_APPS = {
    "hedera": hedera_demo,
}
