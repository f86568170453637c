"""Files spherelab writes (exports, bundles, checkpoints): they appear complete or not at all."""

import uuid
from pathlib import Path

from .errors import StoreError


def write_atomically(path, write, *, what: str = "the file",
                     fix: str = "choose a path in a folder that exists, is writable and has space") -> None:
    """Call write(temporary) for a temporary file beside `path`, then rename it to `path`: the file
    appears complete or not at all, and nothing is left behind on failure. An OSError (a missing or
    read-only folder, `path` being a folder, a full disk) is one line of StoreError ending in `fix`,
    in the words of the surface that asked (a CLI flag, a form field)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(temporary)
        temporary.replace(path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise StoreError(f"cannot write {what} {path} ({exc.strerror or exc}): {fix}") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
