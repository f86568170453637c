"""The product's waits, each overridable through the environment.

The defaults are what users get. A test that has to see a heartbeat go stale, a stale check come
round or a lock outlast SQLite's busy timeout sets the variable in the environment of the processes
it starts, so that it waits on the event itself instead of on seconds of product time.
"""
import math
import os


def seconds(variable: str, default: float) -> float:
    """$variable as a positive number of seconds, else default; anything else is refused by name."""
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{variable}={raw!r} must be a positive number of seconds (unset it for the default, "
                         f"{default:g})")
    return value
