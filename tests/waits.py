"""Waiting for a condition instead of sleeping a fixed time: tests poll what they wait for, with a
generous bound that only a hang reaches (the bound is no timing threshold: a busy machine is slow,
a broken one never gets there)."""
from __future__ import annotations

import time
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 60.0, interval: float = 0.01) -> Optional[T]:
    """Call ``condition()`` until it returns something truthy (returned) or ``timeout`` passes (None)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)
