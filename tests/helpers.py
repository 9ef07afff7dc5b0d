"""Helpers the tests share (kept out of conftest so test modules can import them by a unique name)."""

from __future__ import annotations


def generate(pipe, seed: int = 0, steps: int = 3):
    """The demo image as a float array in [0, 1]."""
    from diffusers_quant.demo import generate_kwargs

    pipe.set_progress_bar_config(disable=True)
    return pipe(
        **generate_kwargs(pipe, prompt="a red cat on a tree", steps=steps, seed=seed), output_type="np"
    ).images[0]


def rel_l2(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
