"""Pickle checkpoints (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) are read as data only.

diffusers and transformers load them with ``torch.load(weights_only=True)``, whose unpickler refuses any
global outside torch's allow-list before calling it; but the refusal is torch's ``UnpicklingError`` deep in
the load. The hooks check a pickle checkpoint the same way first (memory-mapped: nothing is copied for the
zip format torch writes) and refuse it with this package's error, naming the file and the fix.
"""

from __future__ import annotations

import os
import pickle
import zipfile

from .errors import QuantError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


def is_pickle_checkpoint(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(PICKLE_SUFFIXES) and os.path.isfile(path)


def check_pickle(path: str | os.PathLike) -> None:
    """Raise QuantError unless ``path`` loads with torch's weights-only unpickler (no code runs either way)."""
    import torch

    mmap = zipfile.is_zipfile(path)  # the legacy (pre-zip) format cannot be memory-mapped
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QuantError(
            f"{path}: this pickle checkpoint holds more than tensors, and loading it could run code "
            f"({first[:200]}); it was not loaded. fix: convert it to .safetensors with a tool you trust, "
            "or load a .safetensors version of the model"
        ) from None
    except (EOFError, RuntimeError, ValueError, zipfile.BadZipFile) as e:
        raise QuantError(
            f"{path}: not a readable torch checkpoint ({type(e).__name__}: {str(e)[:200]})"
        ) from None


def check_folder_pickles(folder: str | os.PathLike | None) -> None:
    """Check the pickle weight files a model folder would be loaded from (those with no safetensors beside)."""
    if folder is None or not os.path.isdir(folder):
        return
    names = os.listdir(folder)
    if any(n.endswith(".safetensors") for n in names):
        return  # the libraries prefer safetensors and never open the pickles
    for name in sorted(names):
        if name.endswith(".bin") and "model" in name:
            check_pickle(os.path.join(folder, name))
