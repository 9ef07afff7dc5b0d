"""The C dequantization kernels (cpu_kernels.py / cpu_kernels.c) against each backend's pure-torch reference:
every output bit for bit (NaN where the reference has NaN), tails and edge values included; the layers
taking them on the CPU; the fallback where they cannot be built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from diffusers_quant import cpu_kernels, fused
from diffusers_quant.backends import get_backend
from diffusers_quant.backends import quanto as quanto_backend
from diffusers_quant.backends.bnb_int8 import int8_weight
from diffusers_quant.backends.gguf.dequant import DEQUANTIZERS, block_info
from diffusers_quant.backends.gguf.nn import GGUFLinear
from diffusers_quant.backends.gguf.quantize import to_ggml
from diffusers_quant.backends.nncf_ops import decompress, decompress_cpu
from diffusers_quant.spec import Spec

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
HALF = (torch.bfloat16, torch.float16)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[-1].split())


# Where a compiler and AVX-512 are there (this project's CI machine) the kernels must build: a test that
# skipped there would hide a broken build.
EXPECTED = cpu_kernels._compiler() is not None and {"avx512f", "avx512bw", "avx512vl"} <= _cpu_flags()


@pytest.fixture
def built():
    if cpu_kernels.library() is None:
        assert not EXPECTED, cpu_kernels.unavailable_reason()
        pytest.skip(f"C kernels not built here: {cpu_kernels.unavailable_reason()}")


def _same(got: torch.Tensor | None, want: torch.Tensor) -> None:
    """Equal bit for bit, except that any NaN matches any NaN (torch's own vector and scalar casts write
    different NaN patterns)."""
    assert got is not None
    assert got.shape == want.shape and got.dtype == want.dtype
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    ints = {2: torch.int16, 4: torch.int32}[want.element_size()]
    assert torch.equal(got[~nan].view(ints), want[~nan].view(ints))


def _edge_scales(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Row scales: ordinary ones, then zero, negative, subnormal-making, overflowing, inf and NaN."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.rand(n, generator=gen) * 0.02 + 1e-4
    edge = [0.0, -0.013, 1e-39, 3e-38, 6e-5, 3e38, float("inf"), float("nan")]
    scales[: len(edge)] = torch.tensor(edge)
    return scales.to(dtype).reshape(n, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("codes", ["int8", "float8"])
def test_quanto_8bit_rows_equal_quantos_dequantization(codes, dtype, built):
    """Every code (every finite float8 e4m3 code, subnormals and +-448 included) times edge scales; 100
    columns leave a tail after the 16-lane vectors."""
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(-128, 128, (37, 100), generator=gen, dtype=torch.int8)
    data[:, :5] = torch.tensor([0, 1, -1, 127, -128], dtype=torch.int8)
    if codes == "float8":
        data[(data == 127) | (data == -1)] = 0  # the NaN codes, which quanto never writes
        data = data.view(torch.float8_e4m3fn)
    scale = _edge_scales(37, dtype)
    _same(cpu_kernels.quanto_bytes(data, scale), quanto_backend._bytes_weight(data, scale))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitsandbytes_int8_rows_equal_its_dequantization(dtype, built):
    """Every int8 code times edge row absmaxes (float32: bitsandbytes' SCB); a tail after the vectors."""
    gen = torch.Generator().manual_seed(2)
    data = torch.randint(-128, 128, (37, 100), generator=gen, dtype=torch.int8)
    data[:, :5] = torch.tensor([0, 1, -1, 127, -128], dtype=torch.int8)
    scb = _edge_scales(37, torch.float32).reshape(37) * 1000
    _same(cpu_kernels.bnb_int8(data, scb, dtype), int8_weight(data, scb, dtype))


def _packed(bits: int, group_rows: int, group: int, gen: torch.Generator) -> torch.Tensor:
    per_byte = 8 // bits
    return torch.randint(0, 256, (-(-group_rows // per_byte), group), generator=gen, dtype=torch.uint8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("shift_kind", ["float", "int"])
@pytest.mark.parametrize("group", [64, 24])
def test_quanto_packed_groups_equal_quantos_dequantization(group, shift_kind, bits, dtype, built):
    """Random packed bytes; 25 groups (the last packed row half or three quarters full) of 64 or of 24
    columns (a tail after the vectors); float or integer shifts."""
    gen = torch.Generator().manual_seed(bits * group)
    group_rows = 25
    packed = _packed(bits, group_rows, group, gen)
    scale = _edge_scales(group_rows, dtype)
    if shift_kind == "int":
        shift = torch.randint(0, 2**bits, (group_rows, 1), generator=gen, dtype=torch.uint8)
    else:
        shift = (torch.rand(group_rows, 1, generator=gen) * 0.03 - 0.01).to(dtype)
    rows, cols = group_rows * group // 8, 8
    args = (packed, scale, shift, bits, rows, cols)
    _same(cpu_kernels.quanto_bits(*args), quanto_backend._bits_weight(*args))


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("qtype", ["qint8", "qfloat8", "qint4", "qint2"])
def test_quanto_weights_of_real_layers_decode_as_quanto_does(qtype, dtype, built):
    torch.manual_seed(0)
    linear = torch.nn.Linear(384, 100).to(dtype)
    weight = get_backend("quanto").quantize_linear(linear, Spec.parse(f"quanto:{qtype}"), dtype).weight
    with torch._C.DisableTorchFunctionSubclass():
        if qtype in ("qint4", "qint2"):
            args = (weight._data._data, weight._scale, weight._shift, weight._data.bits, *weight.shape)
            _same(cpu_kernels.quanto_bits(*args), quanto_backend._bits_weight(*args))
        else:
            _same(
                cpu_kernels.quanto_bytes(weight._data, weight._scale),
                quanto_backend._bytes_weight(weight._data, weight._scale),
            )


def _nncf_pieces(bits: int, asym: bool, rows: int, cols: int, groups: int, gen: torch.Generator):
    if bits == 8:
        low, high, dtype = (0, 256, torch.uint8) if asym else (-128, 128, torch.int8)
        weight = torch.randint(low, high, (rows, cols), generator=gen, dtype=dtype)
        zero = torch.randint(0, 256, (rows, 1), generator=gen, dtype=torch.uint8) if asym else None
    else:
        weight = torch.randint(0, 256, ((rows * cols + 1) // 2,), generator=gen, dtype=torch.uint8)
        zero = (
            torch.randint(0, 256, ((rows * groups + 1) // 2,), generator=gen, dtype=torch.uint8)
            if asym
            else None
        )
    scale = torch.rand(rows, groups, generator=gen) * 0.02
    edge = [0.0, -0.01, 1e-7, 6e-8, 65504.0, float("inf"), float("nan")]  # float16 subnormals, max, inf, NaN
    scale.view(-1)[: len(edge)] = torch.tensor(edge)
    return weight, scale.half().view(torch.int16), zero


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "bits,asym,cols,groups",
    [
        (8, True, 100, 1),
        (8, False, 100, 1),
        (4, True, 128, 4),  # groups of 32: whole bytes
        (4, False, 128, 1),
        (4, True, 37, 1),  # odd rows: groups that start mid-byte
        (4, False, 72, 3),  # groups of 24: a tail after the vectors
    ],
)
def test_nncf_equals_nncfs_float16_decompression(bits, asym, cols, groups, dtype, built):
    gen = torch.Generator().manual_seed(bits + cols)
    pieces = (*_nncf_pieces(bits, asym, 21, cols, groups, gen), bits, 21, cols, dtype)
    want = decompress(*pieces)
    _same(cpu_kernels.nncf(*pieces), want)
    _same(decompress_cpu(*pieces), want)  # the torch fallback says the same


def _ggml_blocks(qtype: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` blocks of random bytes whose float16 scales are finite and modest, a few subnormal or zero."""
    size = block_info(qtype)[1]
    blocks = torch.randint(0, 256, (n, size), generator=gen, dtype=torch.uint8)
    at, count = (208, 1) if qtype == "Q6_K" else (0, 1 if qtype in ("Q8_0", "Q4_0", "Q5_0") else 2)
    scales = torch.rand(n, count, generator=gen) * 0.02 - 0.005
    scales[:3] = torch.tensor([0.0, 3e-7, -6e-8]).reshape(3, 1)  # zero and float16 subnormals
    blocks[:, at : at + 2 * count] = scales.half().view(torch.uint8)
    return blocks


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("qtype", list(cpu_kernels.GGML_TYPES))
def test_ggml_blocks_decode_as_the_gguf_forward_does(qtype, dtype, built):
    gen = torch.Generator().manual_seed(len(qtype))
    blocks = _ggml_blocks(qtype, 24, gen)
    rows = blocks.reshape(4, -1)  # a weight's packed rows: 6 blocks a row
    got = cpu_kernels.ggml(qtype, rows, dtype)
    assert got.shape == (4, 6 * block_info(qtype)[0])
    _same(got.reshape(-1), DEQUANTIZERS[qtype](blocks, dtype).reshape(-1))
    torch.manual_seed(2)  # and blocks gguf's quantizers wrote
    real = to_ggml(torch.randn(16, 512) * 0.05, qtype).reshape(16, -1)
    want = DEQUANTIZERS[qtype](real.reshape(-1, block_info(qtype)[1]), dtype).reshape(16, 512)
    _same(cpu_kernels.ggml(qtype, real, dtype), want)


def test_integer_shifts_out_of_range_wrap_as_the_references_int8_subtraction(built):
    """quanto's integer shifts are 0..2**bits - 1; beyond them ``q - shift`` wraps in int8 in the reference,
    and so it does here."""
    gen = torch.Generator().manual_seed(9)
    packed = _packed(4, 8, 32, gen)
    scale = torch.full((8, 1), 0.01, dtype=torch.bfloat16)
    shift = torch.tensor([-120, 120, 127, -128, 0, 15, 100, -100], dtype=torch.int8).reshape(8, 1)
    args = (packed, scale, shift, 4, 8, 32)
    _same(cpu_kernels.quanto_bits(*args), quanto_backend._bits_weight(*args))


def test_pieces_too_small_for_the_weight_are_declined(built):
    """Shapes the references would refuse or broadcast differently are not handed to the C code (it would
    read past them): the wrappers return None."""
    assert (
        cpu_kernels.nncf(
            torch.zeros(2, 16, dtype=torch.int8),
            torch.zeros(4, 1, dtype=torch.int16),
            None,
            8,
            4,
            16,
            torch.float32,
        )
        is None
    )
    assert (
        cpu_kernels.nncf(
            torch.zeros(4, 16, dtype=torch.int8),
            torch.zeros(3, 1, dtype=torch.int16),
            None,
            8,
            4,
            16,
            torch.float32,
        )
        is None
    )
    zero = torch.zeros(2, 1, dtype=torch.uint8)
    assert (
        cpu_kernels.nncf(
            torch.zeros(4, 16, dtype=torch.uint8),
            torch.zeros(4, 1, dtype=torch.int16),
            zero,
            8,
            4,
            16,
            torch.float32,
        )
        is None
    )
    assert (
        cpu_kernels.nncf(
            torch.zeros(10, dtype=torch.uint8),
            torch.zeros(4, 2, dtype=torch.int16),
            None,
            4,
            4,
            16,
            torch.float32,
        )
        is None
    )
    scale = torch.ones(8, 1, dtype=torch.bfloat16)
    assert cpu_kernels.quanto_bits(torch.zeros(3, 16, dtype=torch.uint8), scale, scale, 4, 8, 16) is None
    assert (
        cpu_kernels.quanto_bytes(torch.zeros(8, 8, dtype=torch.int8), torch.ones(8, dtype=torch.bfloat16))
        is None
    )


def test_kernels_decline_what_they_do_not_cover(built):
    blocks = to_ggml(torch.randn(8, 256), "Q8_0").reshape(8, -1)
    assert cpu_kernels.ggml("Q8_0", blocks, torch.float32) is None  # the reference decodes float32 exactly
    assert cpu_kernels.ggml("Q3_K", torch.zeros(8, 110, dtype=torch.uint8), torch.bfloat16) is None
    assert cpu_kernels.ggml("Q8_0", blocks[:, :33], torch.bfloat16) is None  # not whole blocks
    assert cpu_kernels.ggml("Q8_0", blocks.t(), torch.bfloat16) is None  # not contiguous
    data = torch.zeros(4, 32, dtype=torch.int8)
    assert cpu_kernels.quanto_bytes(data.t(), torch.ones(32, 1)) is None
    assert cpu_kernels.quanto_bytes(data.to(torch.int16), torch.ones(4, 1)) is None
    assert cpu_kernels.quanto_bytes(data, torch.ones(4, 1, dtype=torch.float64)) is None
    packed, scale = torch.zeros(2, 32, dtype=torch.uint8), torch.ones(4, 1, dtype=torch.bfloat16)
    assert cpu_kernels.quanto_bits(packed, scale, scale.half(), 4, 4, 32) is None  # shift dtype differs
    assert cpu_kernels.quanto_bits(packed, scale, scale, 3, 4, 32) is None
    weight, half_scale = torch.zeros(4, 32, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.int16)
    assert cpu_kernels.nncf(weight, half_scale, None, 8, 4, 32, torch.float64) is None
    assert cpu_kernels.nncf(weight, half_scale.float(), None, 8, 4, 32, torch.bfloat16) is None
    scb = torch.ones(4)
    assert cpu_kernels.bnb_int8(data, scb.half(), torch.bfloat16) is None  # SCB is float32
    assert cpu_kernels.bnb_int8(data, scb[:3], torch.bfloat16) is None
    assert cpu_kernels.bnb_int8(data.view(torch.uint8), scb, torch.bfloat16) is None
    assert cpu_kernels.bnb_int8(data, scb, torch.float64) is None


LAYERS = [
    ("bnb", "int8"),
    ("quanto", "qint8"),
    ("quanto", "qfloat8"),
    ("quanto", "qint4"),
    ("quanto", "qint2"),
    ("nncf", "int8"),
    ("nncf", "int4_sym"),
    ("gguf", "q4_0"),
    ("gguf", "q8_0"),
    ("gguf", "q4_k"),
]


def _layer(backend: str, qtype: str, dtype=torch.bfloat16):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96).to(dtype)
    if backend == "gguf":
        return GGUFLinear.from_linear(linear, qtype.upper(), compute_dtype=dtype)
    return get_backend(backend).quantize_linear(linear, Spec.parse(f"{backend}:{qtype}"), dtype)


@pytest.mark.parametrize("backend,qtype", LAYERS)
def test_cpu_layers_take_the_c_kernel_and_match_the_torch_path(backend, qtype, built, monkeypatch):
    """Eager on the CPU a layer decodes with the C kernel; with the library missing it decodes with its torch
    CPU path, and both forwards agree bit for bit (as does the pure-torch reference's, except quanto's own
    matmul, which scales after an integer matmul, and bitsandbytes' LLM.int8)."""
    monkeypatch.delenv(fused.REFERENCE_ENV, raising=False)
    monkeypatch.setenv(fused.FUSED_ENV, "all")
    layer = _layer(backend, qtype)
    x = torch.randn(2, 9, 256, dtype=torch.bfloat16)
    name = {"quanto": "quanto_bits" if qtype in ("qint4", "qint2") else "quanto_bytes"}.get(backend, backend)
    name = {"gguf": "ggml", "bnb": "bnb_int8"}.get(backend, name)
    calls = []
    real = getattr(cpu_kernels, name)
    monkeypatch.setattr(cpu_kernels, name, lambda *a: calls.append(1) or real(*a))
    with_c = layer(x)
    assert calls, f"{backend}:{qtype} did not call cpu_kernels.{name}"
    monkeypatch.setattr(cpu_kernels, "library", lambda: None)
    without = layer(x)
    assert torch.equal(with_c, without)
    if backend not in ("quanto", "bnb"):  # forced, bnb runs LLM.int8 (tests/backends/test_bnb_int8.py)
        monkeypatch.setenv(fused.REFERENCE_ENV, "1")
        assert torch.equal(with_c, layer(x))


def test_the_switches_turn_the_kernels_off(built, monkeypatch):
    """DIFFUSERS_QUANT_FUSED=none and DIFFUSERS_QUANT_REFERENCE=1 keep the C kernels out of a forward."""
    layer = _layer("gguf", "q8_0")
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    calls = []
    real = cpu_kernels.ggml
    monkeypatch.setattr(cpu_kernels, "ggml", lambda *a: calls.append(1) or real(*a))
    for name, value in ((fused.FUSED_ENV, "none"), (fused.REFERENCE_ENV, "1")):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            layer(x)
    assert not calls


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """A build into an empty cache folder; the process's own library is restored afterwards."""
    monkeypatch.setenv("DIFFUSERS_QUANT_CACHE", str(tmp_path))
    cpu_kernels.library.cache_clear()
    yield tmp_path
    cpu_kernels.library.cache_clear()
    monkeypatch.undo()
    cpu_kernels.library()


def test_a_compiler_command_may_carry_arguments(fresh_build, monkeypatch):
    """``CC="gcc -O2"`` (or ``ccache gcc``): the first word is the program, the rest go before the flags."""
    compiler = cpu_kernels._compiler()
    if compiler is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("CC", f"{compiler[0]} -DUNUSED_BY_THE_SOURCE=1")
    assert cpu_kernels._compiler() == [compiler[0], "-DUNUSED_BY_THE_SOURCE=1"]
    if EXPECTED:
        assert cpu_kernels.library() is not None, cpu_kernels.unavailable_reason()


def test_a_build_is_cached_and_reused(fresh_build, built):
    assert cpu_kernels.library() is not None
    (built_file,) = (fresh_build / "native").glob("cpu_kernels-*.so")
    stamp = built_file.stat().st_mtime_ns
    cpu_kernels.library.cache_clear()
    assert cpu_kernels.library() is not None
    assert list((fresh_build / "native").iterdir()) == [built_file]  # no scratch file left, no rebuild
    assert built_file.stat().st_mtime_ns == stamp
    assert built_file.stat().st_mode & 0o755 == 0o755  # readable by the other users of a shared cache
    # a file a crash left behind is built again, in a fresh process (this one holds the library loaded,
    # and a dlopen of the same path returns that): a new file in its place, as this process maps the old one
    broken = built_file.with_suffix(".broken")
    broken.write_bytes(b"truncated")
    os.replace(broken, built_file)
    child = "from diffusers_quant import cpu_kernels; print(cpu_kernels.library() is not None)"
    ran = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert ran.stdout.strip() == "True", ran.stderr[-2000:]
    assert built_file.stat().st_size > 1000


def test_a_cpu_without_avx512_keeps_the_torch_decode(fresh_build, monkeypatch):
    """Built for a CPU without AVX-512 (here: told to leave it out), the library holds no kernels: it is not
    used, and the reason says why."""
    if cpu_kernels._compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setattr(cpu_kernels, "FLAGS", (*cpu_kernels.FLAGS, "-mno-avx512f"))
    assert cpu_kernels.library() is None
    assert "no AVX-512" in cpu_kernels.unavailable_reason()
    assert cpu_kernels.ggml("Q8_0", torch.zeros(2, 34, dtype=torch.uint8), torch.bfloat16) is None


def test_without_a_working_compiler_the_layers_keep_their_torch_decode(fresh_build, monkeypatch, tmp_path):
    """A missing compiler and a failing one: no library, a reason that names the cause, nothing left in the
    cache folder, and the layers still run (their torch CPU path)."""
    monkeypatch.setenv("CC", "no-such-compiler-here")
    assert cpu_kernels.library() is None
    assert "no C compiler found" in cpu_kernels.unavailable_reason()
    cpu_kernels.library.cache_clear()
    failing = shutil.which("false")
    if failing is None:
        pytest.skip("no `false` program to stand in for a failing compiler")
    monkeypatch.setenv("CC", failing)
    assert cpu_kernels.library() is None
    assert "failed to build" in cpu_kernels.unavailable_reason()
    native = fresh_build / "native"
    assert not native.exists() or not os.listdir(native)
    layer = _layer("nncf", "int8")
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    monkeypatch.setenv(fused.REFERENCE_ENV, "1")
    want = layer(x)
    monkeypatch.delenv(fused.REFERENCE_ENV)
    assert torch.equal(layer(x), want)
