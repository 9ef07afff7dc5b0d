"""Recognise pre-quantized checkpoints from their first bytes, before any tensor is read."""

from __future__ import annotations

import os

GGUF_MAGIC = b"GGUF"


def is_gguf_file(path) -> bool:
    """A GGUF file, whatever its name: its first four bytes are the magic."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC
