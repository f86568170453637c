"""Errors the store raises: each message is one line saying what is wrong and how to fix it."""


class StoreError(Exception):
    """A problem with the database or with what was asked of it."""


class RunNotFound(StoreError):
    """No run with the given id."""


class SweepNotFound(StoreError):
    """No sweep with the given id."""


class StoreBusy(StoreError):
    """The database stayed locked (another process held its lock) for longer than the store waits.
    Nothing of the call was written; the same call may succeed later."""
