"""JSON stored as TEXT (portable across SQLite and PostgreSQL). NaN/inf are allowed in payloads."""

import json

from .errors import StoreError


def to_json(obj, what: str) -> str:
    try:
        return json.dumps(obj, default=_plain)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} cannot be stored as JSON ({exc}): use dicts, lists, strings and numbers") from None


def from_json(text):
    return json.loads(text) if text else None


def _plain(obj):
    # numpy and torch scalars (e.g. an ELR taken from np.logspace) carry .item()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")
