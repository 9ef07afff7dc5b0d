"""Written files get the modes ordinary ones get: temp-name-then-rename writers start from mkstemp /
mkdtemp (0600 / 0700) or libraries that write 0600, and what they leave behind should follow the umask."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator

from .errors import QuantError


def normal_mode(directory: bool = False) -> int:
    """The mode ``open`` / ``mkdir`` would give a new file (or folder) under the current umask."""
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
    """A temporary file next to ``path`` to write; moved over ``path`` (with the usual mode) only when the
    block ends without an error, removed otherwise: a failed or killed write never leaves a partial file
    and never clobbers the previous one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, normal_mode())  # mkstemp creates 0600; give the usual umask-based mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json_object(path, what: str = "JSON config") -> dict | None:
    """The JSON object in ``path`` (None when there is no such file); a damaged one is a QuantError naming
    the file and ``what`` it should be."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            parsed = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise QuantError(
            f"{path}: not a readable {what} ({type(exc).__name__}: {str(exc)[:200]}); fix: re-save or "
            "re-download it"
        ) from None
    if not isinstance(parsed, dict):
        raise QuantError(
            f"{path}: damaged {what} (a JSON {type(parsed).__name__}, not an object); fix: re-save it"
        )
    return parsed
