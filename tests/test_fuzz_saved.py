"""Seeded fuzz of saved quantized folders (issue 14, finding 8a): for each layout the package saves (this
package's layer map for nncf, gguf, quanto and bnb; quanto's and bitsandbytes' own), bytes of the safetensors
header, values of the config.json quantization map and the shard index are mutated, and the folder is loaded
through the hooks in a child process (tests/fuzzing.py). The only allowed outcomes: our QuantError naming a
file of the folder, or a load whose forward equals the unmutated model's. The folder is never changed."""

from __future__ import annotations

import pytest
from fuzzing import findings, run_cases

SPECS = {
    "nncf": "nncf:int8_sym",
    "gguf": "gguf:q8_0",
    "quanto-ours": "quanto:qint4",
    "quanto-native": "quanto:qint8?include=*attn.to_q|*attn.to_k",
    "bnb-ours": "bnb:nf4",
    "bnb-native": "bnb:int8?include=*attn.to_q|*attn.to_k",
}
SHARDED = "nncf-sharded"
CASES_PER_TARGET = 2  # 28 cases, ~0.6 s each here; building the seven folders is most of the time

SETUP = r'''
import copy, hashlib, json, random, shutil, string, struct, tempfile
from pathlib import Path

import torch
import diffusers_quant
from diffusers import FluxTransformer2DModel
from diffusers_quant.demo import demo_path

SPECS = json.loads(SPECS_JSON)
ROOT = Path(tempfile.mkdtemp(prefix="fuzz-saved-"))
INDEX = "diffusion_pytorch_model.safetensors.index.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
ALNUM = (string.ascii_letters + string.digits + "_.").encode()


def _inputs(model):
    g = torch.Generator().manual_seed(1)
    c = model.config
    return dict(
        hidden_states=torch.randn(1, 16, c.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, 8, c.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False,
    )


def _forward(model):
    with torch.no_grad():
        return model(**_inputs(model))[0]


SAVED, REFERENCE = {}, {}
BASE = FluxTransformer2DModel.from_pretrained(demo_path("flux"), subfolder="transformer")
for name, spec in [*SPECS.items(), ("nncf-sharded", SPECS["nncf"])]:
    model = copy.deepcopy(BASE)
    diffusers_quant.quantize(model, spec, kind="transformer")
    kwargs = {"max_shard_size": "200KB"} if name == "nncf-sharded" else {}
    SAVED[name] = diffusers_quant.save_quantized(model, ROOT / name, **kwargs)
diffusers_quant.install()
for name, folder in SAVED.items():  # what the hooks load from the intact folder
    REFERENCE[name] = _forward(FluxTransformer2DModel.from_pretrained(folder))


def _substitute(data, start, end, rng, count):
    """``count`` letters / digits of data[start:end] replaced by others: the JSON mostly stays valid."""
    spots = [i for i in range(start, end) if data[i] in ALNUM]
    for _ in range(count):
        data[rng.choice(spots)] = rng.choice(ALNUM)


def _random_value(rng):
    return rng.choice([None, True, -1, 0, 7, 2**40, 1.5, "", "x", "nf4", "../x", [], [1], {}, {"a": 1}])


def _replace_a_value(tree, rng):
    """One value somewhere in the JSON tree replaced by a random one (or a key dropped)."""
    node = tree
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return
        key = rng.choice(keys)
        child = node[key]
        if isinstance(child, (dict, list)) and child and rng.random() < 0.7:
            node = child
            continue
        if isinstance(node, dict) and rng.random() < 0.2:
            del node[key]
        else:
            node[key] = _random_value(rng)
        return


def _mutate(folder, what, rng):
    if what == "header":
        path = folder / WEIGHTS if (folder / WEIGHTS).exists() else sorted(folder.glob("*.safetensors"))[0]
        data = bytearray(path.read_bytes())
        length = struct.unpack("<Q", bytes(data[:8]))[0]
        if rng.random() < 0.7:
            _substitute(data, 8, 8 + length, rng, rng.randint(1, 2))
        else:
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(8 + length)] = rng.randrange(256)
        path.write_bytes(bytes(data))
    elif what == "config":
        path = folder / "config.json"
        text = path.read_text()
        if rng.random() < 0.5:
            data = bytearray(text.encode())
            start = text.index('"quantization_config"') + len('"quantization_config"')
            _substitute(data, start, len(data), rng, 1)
            path.write_bytes(bytes(data))
        else:
            config = json.loads(text)
            _replace_a_value(config["quantization_config"], rng)
            path.write_text(json.dumps(config))
    else:  # the shard index
        path = folder / INDEX
        if rng.random() < 0.4:
            data = bytearray(path.read_bytes())
            _substitute(data, 0, len(data), rng, 1)
            path.write_bytes(bytes(data))
        else:
            index = json.loads(path.read_text())
            _replace_a_value(index, rng)
            path.write_text(json.dumps(index))


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def case(target, what, seed):
    folder = ROOT / "case" / f"{target}-{what}-{seed}"
    shutil.copytree(SAVED[target], folder)
    _mutate(folder, what, random.Random(f"{target}/{what}/{seed}"))
    before = _digest(folder)
    try:
        model = FluxTransformer2DModel.from_pretrained(folder)
        assert torch.equal(_forward(model), REFERENCE[target]), "loaded, but its forward differs"
    except QuantError as error:
        if str(folder) not in str(error):
            raise AssertionError(f"our error names no file of the folder: {error}") from None
        raise
    finally:
        assert _digest(folder) == before, "the load changed the folder"
'''


def test_mutated_saved_folders_are_refused_with_the_file_named_or_load_right():
    import json

    cases = [
        {"target": target, "what": what, "seed": seed}
        for target in SPECS
        for what in ("header", "config")
        for seed in range(CASES_PER_TARGET)
    ]
    cases += [{"target": SHARDED, "what": "index", "seed": seed} for seed in range(2 * CASES_PER_TARGET)]
    outcomes = run_cases(SETUP.replace("SPECS_JSON", repr(json.dumps(SPECS))), cases, case_timeout=30)
    bad = findings(outcomes)
    assert not bad, "\n".join(o.describe() for o in bad)
    refused = [o for o in outcomes if o.outcome == "refused"]
    assert len(refused) > len(cases) // 2, "the mutations must mostly damage the folder"
    assert all("fix: " in o.message or "fix " in o.message for o in refused), [
        o.message for o in refused if "fix" not in o.message
    ]


@pytest.mark.parametrize("target", ["quanto-native", "bnb-native"])
def test_the_native_targets_are_saved_in_the_libraries_layout(target, tmp_path, flux_path):
    """The fuzz covers the libraries' own layouts only if those selections do save in them."""
    import json

    from diffusers import FluxTransformer2DModel

    import diffusers_quant

    model = FluxTransformer2DModel.from_pretrained(flux_path, subfolder="transformer")
    diffusers_quant.quantize(model, SPECS[target], kind="transformer")
    diffusers_quant.save_quantized(model, tmp_path / "saved")
    qconfig = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == {"quanto-native": "quanto", "bnb-native": "bitsandbytes"}[target]
