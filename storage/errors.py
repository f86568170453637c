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


class ClaimLost(StoreError):
    """A write on behalf of a claimed run found that this process no longer holds it: the run was
    deleted, cancelled, declared stale or claimed by someone else. Nothing of the call was written;
    the process must stop working on the run and write nothing more for it."""
