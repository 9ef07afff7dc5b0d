"""Helpers the tests share (kept out of conftest so test modules can import them by a unique name)."""

from __future__ import annotations


def generate(pipe, seed: int = 0, steps: int = 3):
    """The demo image as a float array in [0, 1]."""
    from diffusers_quant.demo import generate_kwargs

    pipe.set_progress_bar_config(disable=True)
    return pipe(
        **generate_kwargs(pipe, prompt="a red cat on a tree", steps=steps, seed=seed), output_type="np"
    ).images[0]


def wide_flux_transformer(num_single_layers: int):
    """A Flux transformer at real width (6 heads of 128) but one double block: large enough (tens of MB)
    to see memory clearly, seeded so every test builds the same weights."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        in_channels=64,
        num_layers=1,
        num_single_layers=num_single_layers,
        attention_head_dim=128,
        num_attention_heads=6,
        joint_attention_dim=768,
        pooled_projection_dim=256,
        axes_dims_rope=(16, 56, 56),
    )


def rel_l2(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def compiled_graph_ops(module, x, fullgraph: bool = False):
    """``module(x)`` compiled, and the ops of its graphs: dynamo's (where our ops appear by name) and the ones
    AOTAutograd hands the compiler (where a ``triton_op`` is already decomposed: which ops the layer runs)."""
    import torch
    from torch._dynamo.backends.common import aot_autograd

    ops: set[str] = set()

    def record(gm, _inputs):
        ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    aot = aot_autograd(fw_compiler=record)

    def backend(gm, inputs):
        record(gm, inputs)
        return aot(gm, inputs)

    torch._dynamo.reset()
    return torch.compile(module, backend=backend, fullgraph=fullgraph)(x), ops
