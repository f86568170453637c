"""Orderly shutdown of a run process: SIGTERM sets a flag that training checks between steps.

Raising from the signal handler instead (the old KeyboardInterrupt) lands wherever the process
happens to be: inside a store transaction, or inside a finaliser, where Python prints "Exception
ignored" and training simply goes on — a worker then waits on a child that never stops.
"""
from __future__ import annotations

import signal
import sys
import threading

EX_TEMPFAIL = 75   # a run process's exit code when the store stayed locked and its runs' end went unrecorded

_requested = threading.Event()


def request(*_signal_args) -> None:
    """Signal handler: ask the run(s) in this process to stop at the next step, resumable."""
    _requested.set()


def clear() -> None:
    """Forget a stop asked for earlier: a process that trains again afterwards (a reused Ray worker)."""
    _requested.clear()


def requested() -> bool:
    return _requested.is_set()


def stop_on_ctrl_c() -> None:
    """For a command that trains here (train, sweep, study): the first Ctrl-C asks for the same orderly
    stop as SIGTERM (the runs end `interrupted`, resumable, and the command exits at the next safe
    point); a second one interrupts at once."""
    def first(*_signal_args) -> None:
        request()
        sys.stderr.write("stopping at the next step, resumable (Ctrl-C again to stop at once)\n")
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGINT, first)


def raise_if_requested() -> None:
    """At a safe point (no store transaction open): end the command as Ctrl-C would."""
    if requested():
        raise KeyboardInterrupt
