"""A seeded, very small Flux transformer and GGUF files of it, for the bad-input and fuzz tests (importable by
a unique name, so the fuzz children can use it too)."""

from __future__ import annotations

import json

import numpy as np
import torch

CONFIG = {
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": False,
    "axes_dims_rope": [8, 12, 12],
}


def tiny_flux():
    """The model (float32, eval) and its config as the project's writer embeds it."""
    from diffusers import FluxTransformer2DModel

    from diffusers_quant.backends.gguf import portable_config

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**CONFIG).eval()
    return model, portable_config(model.config)


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 16, 4, generator=g),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
    }


@torch.no_grad()
def forward(model) -> torch.Tensor:
    return model(**inputs(), return_dict=False)[0]


def write_with_gguf_py(path, state: dict, config: dict | str | None, types: dict[str, str] | None = None):
    """A GGUF file written by gguf-py itself (not the project's writer): every tensor F32 unless ``types``
    says otherwise: F64 / I8 / I16 / I32 (plain values), Q8_0, Q8_K or Q1_0 (encoded here)."""
    import gguf

    from diffusers_quant.backends.gguf.writer import CONFIG_KEY

    writer = gguf.GGUFWriter(str(path), "flux")
    if config is not None:
        writer.add_string(CONFIG_KEY, config if isinstance(config, str) else json.dumps(config))
    for name, tensor in state.items():
        kind = (types or {}).get(name, "F32")
        x = tensor.detach().float().numpy()
        if kind in ("F32", "F64"):
            writer.add_tensor(name, x.astype(np.float64 if kind == "F64" else np.float32))
        elif kind.startswith("I"):
            writer.add_tensor(name, x.astype({"I8": np.int8, "I16": np.int16, "I32": np.int32}[kind]))
        else:
            encoders = {
                "Q8_0": lambda v: gguf.quants.quantize(v, gguf.GGMLQuantizationType.Q8_0),
                "Q8_K": encode_q8_k,
                "Q1_0": encode_q1_0,
            }
            raw = encoders[kind](x)
            writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def encode_q8_k(x: np.ndarray) -> np.ndarray:
    """(rows, cols) float32 -> Q8_K bytes (rows, cols / 256 * 292): float d, int8 qs[256], int16 bsums[16]."""
    rows = x.shape[0]
    blocks = x.reshape(-1, 256)
    d = (np.abs(blocks).max(axis=1, keepdims=True) / 127).astype(np.float32)
    qs = np.round(blocks / np.where(d == 0, 1, d)).clip(-127, 127).astype(np.int8)
    bsums = qs.reshape(-1, 16, 16).astype(np.int16).sum(axis=2, dtype=np.int16)
    out = np.concatenate([d.view(np.uint8), qs.view(np.uint8), bsums.view(np.uint8)], axis=1)
    return out.reshape(rows, -1)


def decode_q8_k(x: np.ndarray) -> np.ndarray:
    blocks = x.reshape(-1, 256)
    d = (np.abs(blocks).max(axis=1, keepdims=True) / 127).astype(np.float32)
    qs = np.round(blocks / np.where(d == 0, 1, d)).clip(-127, 127).astype(np.int8)
    return (d * qs.astype(np.float32)).reshape(x.shape)


def encode_q1_0(x: np.ndarray) -> np.ndarray:
    """(rows, cols) float32 -> Q1_0 bytes: fp16 d (mean |x| of the block), one sign bit per value."""
    rows = x.shape[0]
    blocks = x.reshape(-1, 128)
    d = np.abs(blocks).mean(axis=1, keepdims=True).astype(np.float16)
    bits = (blocks >= 0).astype(np.uint8).reshape(-1, 16, 8)
    qs = (bits << np.arange(8, dtype=np.uint8)).sum(axis=2, dtype=np.uint8)
    return np.concatenate([d.view(np.uint8), qs], axis=1).reshape(rows, -1)


def decode_q1_0(x: np.ndarray) -> np.ndarray:
    blocks = x.reshape(-1, 128)
    d = np.abs(blocks).mean(axis=1, keepdims=True).astype(np.float16).astype(np.float32)
    return np.where(blocks >= 0, d, -d).reshape(x.shape).astype(np.float32)
