"""C dequantization kernels for the CPU: the eager weight-only path of quanto, NNCF and GGUF layers there.

Written as torch ops a dequantization is several passes (unpack, subtract, scale, round, regroup), each
reading and writing the whole weight, and on a small diffusion model's layers those passes cost as much as
the matmul itself. ``cpu_kernels.c`` does each layout in one pass, with the reference's arithmetic (the
same operations, each rounded to the same dtype: the tests check bit for bit), the twin of ``kernels.py``'s
Triton kernels on CUDA; the functions here take the same arguments as those and return None where they do
not cover a layout, and the caller then runs its pure-torch CPU decode.

The library is built on first use with the machine's C compiler (``$CC``, else ``cc`` / ``gcc`` /
``clang``; ``-O3 -march=native``, so the loops vectorize for this CPU) into the cache folder
(``$DIFFUSERS_QUANT_CACHE/native``), keyed on the source, the compiler and the CPU, and loaded with ctypes.
The kernels are AVX-512 code (x86-64 CPUs since Skylake-SP / Zen 4); elsewhere, without a compiler, or
if the build fails, every function returns None (:func:`unavailable_reason` says
why) and the layers keep their torch decode. ``DIFFUSERS_QUANT_FUSED`` / ``DIFFUSERS_QUANT_REFERENCE``
switch these kernels off as they do the GPU ones (the callers ask ``fused.fast_path``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# the floating-point model pinned: a contracted a * b + c (one FMA, one rounding) or fast math would break
# the kernels' bit-for-bit equality with the references (some compilers, icx, default to both)
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c11", "-ffp-contract=off", "-fno-fast-math")
COMPILERS = ("cc", "gcc", "clang")

_KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_HALF_KINDS = {torch.bfloat16: 0, torch.float16: 1}

_reason: str | None = None  # why the library is not there, once a build was tried


def _compiler() -> list[str] | None:
    """The compiler's command: ``$CC`` (which may carry arguments, ``ccache gcc``), else the first of
    ``COMPILERS`` on PATH."""
    named = os.environ.get("CC")
    if named:
        words = shlex.split(named)
        found = shutil.which(words[0]) if words else None
        return [found, *words[1:]] if found else None
    for name in COMPILERS:
        found = shutil.which(name)
        if found:
            return [found]
    return None


def _cpu_key() -> str:
    """What -march=native compiles for: the CPU's flags (a cache folder may be shared between machines)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_folder() -> Path:
    from .demo import cache_dir

    return cache_dir() / "native"


def _target(compiler: list[str]) -> Path:
    source = SOURCE.read_bytes()
    parts = [source, " ".join(compiler).encode(), " ".join(FLAGS).encode(), _cpu_key().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return _cache_folder() / f"cpu_kernels-{key}.so"


def _build(compiler: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # built beside the target, then renamed into place: a concurrent build never leaves a half-written file
    fd, scratch = tempfile.mkstemp(prefix=target.stem + "-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [*compiler, *FLAGS, str(SOURCE), "-o", scratch],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.chmod(scratch, 0o755)  # mkstemp's 0600 would keep the library from other users of a shared cache
        os.replace(scratch, target)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)


def _load(compiler: list[str]) -> ctypes.CDLL:
    """The cached library, built if missing; one that does not load (a truncated file) is built again."""
    target = _target(compiler)
    if target.exists():
        try:
            return ctypes.CDLL(str(target))
        except OSError:
            target.unlink(missing_ok=True)
    _build(compiler, target)
    return ctypes.CDLL(str(target))


_P = ctypes.c_void_p
_I = ctypes.c_int
_N = ctypes.c_int64
_SIGNATURES = {
    "dq_quanto_bytes": (_P, _I, _P, _P, _N, _N, _I),
    "dq_bnb_int8": (_P, _P, _P, _N, _N, _I),
    "dq_quanto_bits": (_P, _P, _P, _I, _I, _N, _N, _N, _P, _I),
    "dq_nncf": (_P, _P, _P, _I, _I, _N, _N, _N, _P, _I),
    "dq_ggml": (_I, _P, _N, _N, _P, _I),
}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernels, or None (see :func:`unavailable_reason`)."""
    global _reason
    compiler = _compiler()
    if compiler is None:
        _reason = f"no C compiler found ($CC, or one of {', '.join(COMPILERS)} on PATH)"
        return None
    command = " ".join(compiler)
    try:
        lib = _load(compiler)
    except subprocess.CalledProcessError as e:
        _reason = f"{command} failed to build {SOURCE.name}: {(e.stderr or '').strip()[-500:]}"
        return None
    except (OSError, subprocess.SubprocessError) as e:
        _reason = f"could not build or load {SOURCE.name} with {command}: {e}"
        return None
    if not lib.dq_available():  # built for a CPU without AVX-512, the kernels' only vector code
        _reason = f"this CPU (as {command} -march=native sees it) has no AVX-512 F / BW / VL"
        return None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = None
    return lib


def unavailable_reason() -> str | None:
    """Why the kernels are not built here (None if they are, or no build was tried yet)."""
    return _reason


def _ready(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or (t.device.type == "cpu" and t.is_contiguous()) for t in tensors)


def quanto_bytes(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """quanto's 8-bit weight (int8 / float8 e4m3 codes ``[rows, cols]``, ``scale`` ``[rows, 1]``):
    ``scale * q`` in the scale's dtype (``backends.quanto._bytes_weight``)."""
    kind = _KINDS.get(scale.dtype)
    if kind is None or data.dim() != 2 or scale.shape != (data.shape[0], 1) or not _ready(data, scale):
        return None
    if data.dtype not in (torch.int8, torch.float8_e4m3fn):
        return None
    lib = library()
    if lib is None:
        return None
    out = torch.empty(data.shape, dtype=scale.dtype)
    rows, cols = data.shape
    fp8 = data.dtype == torch.float8_e4m3fn
    lib.dq_quanto_bytes(data.data_ptr(), fp8, scale.data_ptr(), out.data_ptr(), rows, cols, kind)
    return out


def bnb_int8(data: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """bitsandbytes' int8 weight (codes ``[rows, cols]``, float32 row absmax ``scb``) in ``dtype``:
    ``q * (scb * (1 / 127))`` rounded once (``backends.bnb_int8.int8_weight``)."""
    kind = _KINDS.get(dtype)
    if kind is None or data.dim() != 2 or data.dtype != torch.int8 or not _ready(data, scb):
        return None
    if scb.dtype != torch.float32 or scb.numel() != data.shape[0]:
        return None
    lib = library()
    if lib is None:
        return None
    out = torch.empty(data.shape, dtype=dtype)
    lib.dq_bnb_int8(data.data_ptr(), scb.data_ptr(), out.data_ptr(), *data.shape, kind)
    return out


def quanto_bits(
    packed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bits: int, rows: int, cols: int
) -> torch.Tensor | None:
    """quanto's packed 2/4-bit weight (``backends.quanto._bits_weight``)."""
    kind = _KINDS.get(scale.dtype)
    group_rows = scale.shape[0]
    if kind is None or packed.dim() != 2 or packed.dtype != torch.uint8 or bits not in (2, 4):
        return None
    group = packed.shape[1]
    if group_rows * group != rows * cols or scale.shape != (group_rows, 1) or shift.shape != scale.shape:
        return None
    if packed.shape[0] * (8 // bits) < group_rows or not _ready(packed, scale, shift):
        return None  # fewer bit fields than groups: the reference fails there
    int_shift = not shift.is_floating_point()
    if int_shift:
        shift = shift.to(torch.int8)  # as the reference subtracts it
    elif shift.dtype != scale.dtype:
        return None
    lib = library()
    if lib is None:
        return None
    out = torch.empty((rows, cols), dtype=scale.dtype)
    lib.dq_quanto_bits(
        packed.data_ptr(), scale.data_ptr(), shift.data_ptr(), int_shift, bits,
        packed.shape[0], group_rows, group, out.data_ptr(), kind,
    )  # fmt: skip
    return out


def nncf(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: int,
    rows: int,
    cols: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """NNCF's weight (``backends.nncf_ops.decompress``): ``(q - zero) * scale`` in float16, then ``dtype``."""
    kind = _KINDS.get(dtype)
    groups = scale.shape[1]
    if kind is None or bits not in (4, 8) or cols % groups or not _ready(weight, scale, zero_point):
        return None
    if scale.dtype != torch.int16 or (zero_point is not None and zero_point.dtype != torch.uint8):
        return None
    if weight.dtype not in (torch.int8, torch.uint8) or (bits == 4 and weight.dtype != torch.uint8):
        return None
    if scale.shape[0] != rows or weight.numel() < (rows * cols if bits == 8 else (rows * cols + 1) // 2):
        return None  # pieces too small for the weight (the reference fails there)
    if zero_point is not None and zero_point.numel() < (rows if bits == 8 else (rows * groups + 1) // 2):
        return None
    lib = library()
    if lib is None:
        return None
    out = torch.empty((rows, cols), dtype=dtype)
    zero = 0 if zero_point is None else zero_point.data_ptr()
    signed = weight.dtype == torch.int8
    lib.dq_nncf(
        weight.data_ptr(), scale.data_ptr(), zero, bits, signed, rows, cols, groups, out.data_ptr(), kind
    )
    return out


# qtype -> (the C function's type, bytes a block, elements a block)
GGML_TYPES = {
    "Q8_0": (0, 34, 32),
    "Q4_0": (1, 18, 32),
    "Q4_1": (2, 20, 32),
    "Q5_0": (3, 22, 32),
    "Q5_1": (4, 24, 32),
    "Q4_K": (10, 144, 256),
    "Q5_K": (11, 176, 256),
    "Q6_K": (12, 210, 256),
}


def covers_ggml(qtype: str, dtype: torch.dtype) -> bool:
    """Whether :func:`ggml` decodes ``qtype`` blocks to ``dtype`` (given contiguous uint8 blocks)."""
    return qtype in GGML_TYPES and dtype in _HALF_KINDS


def ggml(qtype: str, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """ggml blocks decoded in a 16-bit ``dtype`` as the GGUF forward's reference does (``kernels.ggml``'s
    twin): ``uint8`` ``[rows, k * type_size]`` to ``[rows, k * block elements]``; other types: None."""
    plan = GGML_TYPES.get(qtype)
    kind = _HALF_KINDS.get(dtype)
    if plan is None or kind is None or blocks.dtype != torch.uint8 or blocks.dim() != 2 or not _ready(blocks):
        return None
    code, type_size, width = plan
    per_row, rest = divmod(blocks.shape[1], type_size)
    if rest:
        return None
    lib = library()
    if lib is None:
        return None
    out = torch.empty((blocks.shape[0], per_row * width), dtype=dtype)
    lib.dq_ggml(code, blocks.data_ptr(), blocks.shape[0] * per_row, type_size, out.data_ptr(), kind)
    return out
