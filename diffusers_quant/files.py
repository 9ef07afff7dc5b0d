"""Written files get the modes ordinary ones get: temp-name-then-rename writers start from mkstemp /
mkdtemp (0600 / 0700) or libraries that write 0600, and what they leave behind should follow the umask."""

from __future__ import annotations

import os


def normal_mode(directory: bool = False) -> int:
    """The mode ``open`` / ``mkdir`` would give a new file (or folder) under the current umask."""
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask
