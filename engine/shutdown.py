"""Orderly shutdown of a run process: SIGTERM sets a flag that training checks between steps.

Raising from the signal handler instead (the old KeyboardInterrupt) lands wherever the process
happens to be: inside a store transaction, or inside a finaliser, where Python prints "Exception
ignored" and training simply goes on — a worker then waits on a child that never stops.
"""
from __future__ import annotations

import threading

_requested = threading.Event()


def request(*_signal_args) -> None:
    """Signal handler: ask the run(s) in this process to stop at the next step, resumable."""
    _requested.set()


def requested() -> bool:
    return _requested.is_set()
