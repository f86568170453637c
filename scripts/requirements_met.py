"""Exit 0 when every pinned `name==version` of a requirements file (and the files it -r includes) is
installed at that version, else 1 naming the first that is not: scripts/test.sh skips pip then."""
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;#]+)\s*(#.*)?$")


def unmet(path: Path) -> str | None:
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-r "):
            found = unmet(path.parent / line[3:].strip())
            if found:
                return found
            continue
        pin = PIN.match(line)
        if pin is None:
            return f"{line} (not a plain pin: left to pip)"
        name, _, wanted, _ = pin.groups()
        try:
            have = version(name)
        except PackageNotFoundError:
            return f"{name} is not installed"
        if have != wanted and have.split("+")[0] != wanted:      # 2.13.0+cpu satisfies ==2.13.0, as for pip
            return f"{name} {have} is installed, {wanted} is pinned"
    return None


if __name__ == "__main__":
    reason = unmet(Path(sys.argv[1]))
    if reason:
        print(f"installing the pinned requirements: {reason}", file=sys.stderr)
    sys.exit(1 if reason else 0)
