"""Seeded fuzz of GGUF loads (issue 14): a small valid file written by the project's own writer, mutated in its
header bytes, tensor infos, metadata, embedded config and tensor set, then loaded through the hooks
(``from_single_file``) in child processes under a memory limit and a timeout (tests/fuzzing.py).

Every outcome must be ``refused`` (the project's error, naming the file) or ``ok`` with the model's forward
bit-identical to the unmutated file's (each case checks that itself).  Left out on purpose, because no
loader can see them: changes to tensor *data* bytes, relabelling a tensor as another type of the same
layout (F32 <-> I32 reinterprets the same bytes), and well-typed changes to config values that shape no
tensor (axes_dims_rope [8, 12, 12] -> [8, 12, 13] builds the same parameters, and describes another model).
"""

from __future__ import annotations

from pathlib import Path

from fuzzing import findings, run_cases

HERE = Path(__file__).resolve().parent

SETUP = f"""
import json, random, struct, sys, tempfile
sys.path.insert(0, {str(HERE)!r})
import torch
torch.set_num_threads(1)  # a tiny model on a shared machine: threads only contend
import diffusers_quant
from diffusers import FluxTransformer2DModel
from tiny_gguf import forward, tiny_flux
from diffusers_quant.backends.gguf.writer import CONFIG_KEY, write_gguf
from diffusers_quant.backends.gguf.reader import read_gguf
import gguf

import diffusers_quant.backends.gguf.writer as writer_module

# The same tensors are encoded for every file written here: remember each encoding (the bytes are the
# writer's own) so a case costs a header, not a re-quantization.
_encode_once = {{}}
_to_ggml = writer_module.to_ggml

def _remembered(tensor, ttype, *args):
    key = (tensor.data_ptr(), tuple(tensor.shape), ttype)
    if key not in _encode_once:
        _encode_once[key] = _to_ggml(tensor, ttype, *args)
    return _encode_once[key]

writer_module.to_ggml = _remembered
diffusers_quant.install()
MODEL, CONFIG = tiny_flux()
STATE = MODEL.state_dict()
FOLDER = tempfile.mkdtemp(prefix="gguf-fuzz-")
REFERENCE_PATH = FOLDER + "/reference.gguf"
write_gguf(REFERENCE_PATH, STATE, "Q8_0", arch="flux", config=CONFIG)
DATA = open(REFERENCE_PATH, "rb").read()
FILE = read_gguf(REFERENCE_PATH)
REFERENCE = forward(FluxTransformer2DModel.from_single_file(REFERENCE_PATH))
HEADER_END = FILE.data_offset
CONFIG_TEXT = FILE.metadata[CONFIG_KEY].encode()
CONFIG_AT = DATA.find(CONFIG_TEXT)
SIZES = {{t.name: tuple(gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType}}
IDS = {{int(t): t.name for t in gguf.GGMLQuantizationType}}

def info_fields():
    # (name, byte offset of n_dims, n_dims) of every tensor info, found after the metadata
    out = []
    for t in FILE.tensors:
        needle = struct.pack("<Q", len(t.name)) + t.name.encode()
        pos = DATA.rfind(needle, 0, HEADER_END) + len(needle)
        out.append((t, pos, len(t.stored_shape)))
    return out

INFOS = info_fields()
TYPE_BYTES = {{}}  # byte position -> (start of the type field, the tensor's type name)
for t, pos, n in INFOS:
    start = pos + 4 + 8 * n
    for b in range(4):
        TYPE_BYTES[start + b] = (start, t.type_name)

def same_layout_relabel(data, at):
    # a tensor relabelled as another type of the same (block, bytes) layout: undetectable by design
    if at not in TYPE_BYTES:
        return False
    start, old = TYPE_BYTES[at]
    new = IDS.get(struct.unpack_from("<I", data, start)[0])
    return new is not None and new != old and SIZES[new] == SIZES[old]

INTERESTING = [0, 1, 2, 3, 31, 32, 33, 255, 2**31, 2**32 - 1, 2**32, 2**62, 2**63, 2**64 - 1]

def mutate_header(rng):
    data = bytearray(DATA)
    for _ in range(rng.randint(1, 3)):
        while True:
            # not the magic: a file without it is no GGUF file, and with no plan the hooks leave such a
            # file to diffusers (as any other file); the reader's refusal of it is tested in test_reader
            at = rng.randrange(4, HEADER_END)
            if CONFIG_AT <= at < CONFIG_AT + len(CONFIG_TEXT):
                continue  # the config text has its own cases
            before = data[at]
            data[at] = rng.randrange(256) if rng.random() < 0.5 else rng.randrange(32, 127)  # names too
            if same_layout_relabel(data, at):
                data[at] = before
                continue
            break
    return bytes(data)

def mutate_info(rng):
    data = bytearray(DATA)
    t, pos, n = rng.choice(INFOS)
    field = rng.choice(["n_dims", "dim", "type", "offset"])
    if field == "n_dims":
        struct.pack_into("<I", data, pos, rng.choice([0, 1, 2, 3, 4, 5, 9, 2**32 - 1]))
    elif field == "dim":
        at = pos + 4 + 8 * rng.randrange(n)
        old = struct.unpack_from("<Q", data, at)[0]
        value = rng.choice(INTERESTING + [old + 1, old - 1, old * 2, old // 2, rng.getrandbits(64)])
        struct.pack_into("<Q", data, at, value % 2**64)
    elif field == "type":
        choices = [i for i in list(IDS) + [4, 5, 31, 99, 2**32 - 1] if IDS.get(i) is None
                   or SIZES[IDS[i]] != SIZES[t.type_name]]
        struct.pack_into("<I", data, pos + 4 + 8 * n, rng.choice(choices))
    else:
        at = pos + 4 + 8 * n + 4
        old = struct.unpack_from("<Q", data, at)[0]
        value = rng.choice(INTERESTING + [old + 32, old - 32, old + 1, rng.getrandbits(64)])
        struct.pack_into("<Q", data, at, value % 2**64)
    return bytes(data)

BAD_VALUES = [0, -1, 1, 2, 1.5, 2.0, "x", "", None, True, False, [], {{}}, [1], 10**9, 10**30, 1e300]

def config_text(rng):
    how = rng.choice(["value", "value", "unknown", "drop_key", "truncate", "punctuate", "whole"])
    cfg = dict(CONFIG)
    if how == "value":
        key = rng.choice(sorted(cfg))
        cfg[key] = rng.choice(BAD_VALUES)
        return json.dumps(cfg)
    if how == "unknown":
        cfg[rng.choice(["zz", "from_pretrained", "_hidden", "num_layer", ""])] = rng.choice(BAD_VALUES)
        return json.dumps(cfg)
    if how == "drop_key":
        # the default takes its place: the same tensors or a refusal (axes_dims_rope's default would be
        # another model with the same parameters, which is not damage a loader can see)
        cfg.pop(rng.choice(sorted(set(cfg) - {{"axes_dims_rope"}})))
        return json.dumps(cfg)
    text = json.dumps(cfg)
    if how == "truncate":
        return text[: rng.randrange(len(text))]
    if how == "punctuate":
        chars = list(text)
        for _ in range(rng.randint(1, 3)):
            chars[rng.randrange(len(chars))] = rng.choice('{{}}[],:"')
        return "".join(chars)
    return rng.choice(['null', '"/etc"', '[]', '1', '"{{}}"', "{{" * 5000, "[" * 50000, '{{"a": NaN}}',
                       json.dumps(cfg).replace("1", "1" * 5000, 1), "{{}}"])

def metadata(rng):
    name = rng.choice(list(STATE))
    shape = list(STATE[name].shape)
    pick = rng.choice(["alignment", "orig_shape", "orig_shape_same", "extra"])
    if pick == "alignment":
        return {{"general.alignment": rng.choice([0, 1, 2, 3, 8, 16, 48, 64, 2**31, 2**40])}}
    if pick == "orig_shape":
        return {{"comfy.gguf.orig_shape." + name: rng.choice([[0], [1, 2**62], shape[::-1], shape + [1], [-1]])}}
    if pick == "orig_shape_same":
        return {{"comfy.gguf.orig_shape." + name: shape}}
    return {{rng.choice(["general.name", "x.y", CONFIG_KEY + ".x"]): rng.choice(["", "a", 7, 1.5, [1, 2]])}}

def mutated(kind, seed):
    rng = random.Random(seed)
    path = f"{{FOLDER}}/{{kind}}-{{seed}}.gguf"
    if kind == "header":
        open(path, "wb").write(mutate_header(rng))
    elif kind == "info":
        open(path, "wb").write(mutate_info(rng))
    elif kind == "config":
        write_gguf(path, STATE, "Q8_0", arch="flux", metadata={{CONFIG_KEY: config_text(rng)}})
    elif kind == "metadata":
        try:
            extra = metadata(rng)
            write_gguf(path, STATE, "Q8_0", arch="flux", config=CONFIG, metadata=extra)
        except (ValueError, TypeError, OverflowError, struct.error):
            return None  # the writer itself refuses the mutation: nothing to load
    elif kind == "drop":
        gone = set(rng.sample(sorted(STATE), rng.randint(1, 3)))
        write_gguf(path, {{k: v for k, v in STATE.items() if k not in gone}}, "Q8_0", arch="flux", config=CONFIG)
    return path

def case(kind, seed):
    path = mutated(kind, seed)
    if path is None:
        return
    try:
        model = FluxTransformer2DModel.from_single_file(path)
    except QuantError as error:
        assert str(error).startswith(path + ": "), f"the refusal does not start with the file: {{error}}"
        assert "; fix: " in str(error), f"the refusal names no fix: {{error}}"
        raise
    out = forward(model)
    assert torch.equal(out, REFERENCE), (
        f"loaded, but the forward differs from the unmutated file's (max {{(out - REFERENCE).abs().max()}})"
    )
"""

COUNTS = {"header": 80, "info": 80, "config": 64, "metadata": 24, "drop": 12}


def test_mutated_gguf_files_are_refused_naming_the_file_or_load_the_same_model():
    cases = [{"kind": kind, "seed": seed} for kind, n in COUNTS.items() for seed in range(n)]
    outcomes = run_cases(SETUP, cases, case_timeout=20)
    bad = findings(outcomes)
    assert not bad, "\n".join(o.describe() for o in bad[:10])
    by_kind = {kind: [o.outcome for o in outcomes if o.params["kind"] == kind] for kind in COUNTS}
    print({kind: {o: seen.count(o) for o in set(seen)} for kind, seen in by_kind.items()})
    for o in outcomes:
        if o.outcome == "refused":
            assert f"{o.params['kind']}-{o.params['seed']}.gguf" in o.message, o.describe()
    # the mutations reach past the reader: every kind has refusals, and the config and drop cases are
    # refused by the loader (the reader accepts those files)
    assert all("refused" in seen for seen in by_kind.values()), by_kind
    assert by_kind["drop"] == ["refused"] * COUNTS["drop"]
