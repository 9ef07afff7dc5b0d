"""Written files get the modes ordinary ones get: temp-name-then-rename writers start from mkstemp /
mkdtemp (0600 / 0700) or libraries that write 0600, and what they leave behind should follow the umask."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator


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
