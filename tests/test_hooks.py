import shutil
import subprocess
import sys

import pytest
import torch

import diffusers_quant
from diffusers_quant import PlanRefused, QuantError
from diffusers_quant.hooks import targets


def _originals():
    return {(owner, attr): owner.__dict__[attr] for owner, attr in targets()}


def test_import_touches_no_backend_library_and_no_gpu():
    code = (
        "import sys, diffusers_quant; "
        "bad = [m for m in ('bitsandbytes', 'optimum.quanto', 'gguf', 'nncf', 'diffusers', 'torch.cuda') "
        "if m in sys.modules and m != 'torch.cuda']; "
        "import torch; assert not torch.cuda.is_initialized(); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_install_and_uninstall_are_exact_inverses_and_idempotent():
    before = _originals()
    diffusers_quant.install()
    diffusers_quant.install()  # idempotent
    during = _originals()
    assert all(during[k] is not before[k] for k in before)
    # classmethods, and one module function (diffusers' single-file state-dict loader)
    assert all(getattr(getattr(f, "__func__", f), "__diffusers_quant__", False) for f in during.values())
    diffusers_quant.uninstall()
    diffusers_quant.uninstall()  # idempotent
    after = _originals()
    assert all(after[k] is before[k] for k in before), "uninstall must restore the original callables"


def test_context_manager_installs_and_removes_hooks(flux_path):
    from diffusers import FluxTransformer2DModel

    before = _originals()
    with diffusers_quant.quantized("transformer=quanto:qint8"):
        model = FluxTransformer2DModel.from_pretrained(flux_path, subfolder="transformer")
    assert type(model.transformer_blocks[0].attn.to_q).__name__ == "QLinear"
    assert all(_originals()[k] is before[k] for k in before)
    plain = FluxTransformer2DModel.from_pretrained(flux_path, subfolder="transformer")
    assert type(plain.transformer_blocks[0].attn.to_q) is torch.nn.Linear


def test_context_inside_install_keeps_hooks_installed(flux_path):
    diffusers_quant.install()
    with diffusers_quant.quantized("transformer=bnb:int8"):
        pass
    assert diffusers_quant.is_installed()


def test_plain_model_loads_are_quantized(flux_path, sd_path, tmp_path):
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from transformers import T5EncoderModel

    diffusers_quant.install("transformer=bnb:nf4,text_encoder_2=quanto:qint8,unet=quanto:qint8")
    transformer = FluxTransformer2DModel.from_pretrained(flux_path / "transformer")
    assert type(transformer.single_transformer_blocks[0].proj_mlp).__name__ == "Linear4bit"
    t5 = T5EncoderModel.from_pretrained(flux_path / "text_encoder_2")
    assert type(t5.encoder.block[0].layer[0].SelfAttention.q).__name__ == "QLinear"
    assert t5.quant_report["text_encoder_2"].spec == "quanto:qint8"
    unet = UNet2DConditionModel.from_pretrained(sd_path / "unet")
    assert unet.quant_report["unet"].mode == "on-load"
    # a single file goes through diffusers' own single-file loader, then is quantized after load (auto)
    single = tmp_path / "unet.safetensors"
    shutil.copy(sd_path / "unet" / "diffusion_pytorch_model.safetensors", single)
    diffusers_quant.install("unet=quanto:qint8")
    loaded = UNet2DConditionModel.from_single_file(str(single), config=str(sd_path), subfolder="unet")
    assert loaded.quant_report["unet"].mode == "post-load"
    assert loaded.quant_report["unet"].layers_quantized > 0
    assert type(loaded.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q).__name__ == "QLinear"


def test_per_call_plan_beats_ambient_plan(flux_path):
    from diffusers import FluxTransformer2DModel

    diffusers_quant.install("transformer=bnb:nf4")
    model = FluxTransformer2DModel.from_pretrained(
        flux_path / "transformer", quant="transformer=quanto:qint8"
    )
    assert model.quant_report["transformer"].spec == "quanto:qint8"


def test_env_var_plan(flux_path, monkeypatch):
    from diffusers import FluxTransformer2DModel

    monkeypatch.setenv("DIFFUSERS_QUANT", "model=quanto:qint8;mode=post-load")
    diffusers_quant.install()
    model = FluxTransformer2DModel.from_pretrained(flux_path / "transformer")
    assert model.quant_report["transformer"].mode == "post-load"


def test_pattern_matching_nothing_lists_components(flux_path):
    from diffusers import DiffusionPipeline

    diffusers_quant.install()
    with pytest.raises(
        PlanRefused,
        match=r"'transfomer' match no component; this pipeline has: .*"
        r"text_encoder_2 \(text_encoder\), transformer \(transformer\)",
    ):
        DiffusionPipeline.from_pretrained(flux_path, quant="transfomer=bnb:nf4")


def test_refusal_happens_before_any_weight_is_read(flux_path, monkeypatch):
    from diffusers import DiffusionPipeline
    from safetensors import safe_open

    opened = []
    monkeypatch.setattr("safetensors.safe_open", lambda *a, **k: opened.append(a) or safe_open(*a, **k))
    monkeypatch.setattr("safetensors.torch.load_file", lambda *a, **k: opened.append(a))
    diffusers_quant.install()
    with pytest.raises(PlanRefused) as err:
        DiffusionPipeline.from_pretrained(flux_path, quant="transformer=bnb:nf4,vae=quanto:qint8;device=mps")
    assert not opened
    text = str(err.value)
    # all problems at once, each with its fix
    assert "vae (vae)" in text and "fix: leave the VAE out of the plan" in text
    assert "transformer (transformer)" in text and "fix: use device=cpu or device=cuda" in text


def test_device_that_is_not_there_is_refused(flux_path):
    from diffusers import FluxTransformer2DModel

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    diffusers_quant.install()
    with pytest.raises(
        PlanRefused, match=r"device=cuda was asked for but no CUDA device is available; fix: use device=cpu"
    ):
        FluxTransformer2DModel.from_pretrained(
            flux_path / "transformer", quant="transformer=bnb:nf4;device=cuda"
        )


def test_missing_backend_library_names_the_extra(flux_path, monkeypatch):
    from diffusers import FluxTransformer2DModel

    from diffusers_quant.backends import get_backend

    monkeypatch.setattr(type(get_backend("quanto")), "is_available", lambda self: False)
    diffusers_quant.install()
    with pytest.raises(PlanRefused, match=r"pip install 'diffusers-quant\[quanto\]'"):
        FluxTransformer2DModel.from_pretrained(flux_path / "transformer", quant="transformer=quanto:qint8")


def test_on_load_refused_for_bin_weights(tmp_path, flux_path):
    from diffusers import FluxTransformer2DModel

    plain = FluxTransformer2DModel.from_pretrained(flux_path / "transformer")
    plain.save_pretrained(tmp_path / "transformer", safe_serialization=False)
    diffusers_quant.install()
    with pytest.raises(
        QuantError,
        match=r"mode=on-load needs a local folder with safetensors weights.*fix: use mode=post-load",
    ):
        FluxTransformer2DModel.from_pretrained(
            tmp_path / "transformer", quant="transformer=bnb:nf4;mode=on-load"
        )
    auto = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer", quant="transformer=bnb:nf4")
    assert auto.quant_report["transformer"].mode == "post-load"


def test_a_hostile_model_index_entry_is_left_to_diffusers(flux_path, tmp_path):
    """Issue 14, finding 7: ``"unet": ["os", "system"]`` gave "issubclass() arg 1 must be a class"; the hooks
    import only diffusers' and transformers' names, so the pipeline loads as plain diffusers loads it."""
    import json
    import shutil

    from diffusers import DiffusionPipeline

    folder = tmp_path / "flux"
    shutil.copytree(flux_path, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(
        json.dumps({**index, "unet": ["os", "system"], "x": ["..", "y"]})
    )
    diffusers_quant.install("transformer=bnb:nf4")
    try:
        pipe = DiffusionPipeline.from_pretrained(folder)
    finally:
        diffusers_quant.uninstall()
    assert pipe.quant_report["transformer"].spec == "bnb:nf4"


def test_a_damaged_model_index_is_named(flux_path, tmp_path):
    import shutil

    from diffusers import DiffusionPipeline

    folder = tmp_path / "flux"
    shutil.copytree(flux_path, folder)
    for text, message in (("{", "not a readable model_index.json"), ("[1, 2]", "a JSON list, not an object")):
        (folder / "model_index.json").write_text(text)
        diffusers_quant.install("transformer=bnb:nf4")
        try:
            with pytest.raises(QuantError, match=rf"model_index.json: .*{message}"):
                DiffusionPipeline.from_pretrained(folder)
        finally:
            diffusers_quant.uninstall()
        assert (folder / "model_index.json").read_text() == text


_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".ckpt", ".sft", ".pt", ".pth")
_OPENED: list[str] | None = None  # paths opened while a test records them (the audit hook stays installed)


def _audit(event, args):
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes)):
        _OPENED.append(str(args[0]))


@pytest.fixture
def weight_reads(monkeypatch):
    """The weight files opened during the test: Python's own opens (the ``open`` audit event: open, io.open,
    os.open, the header readers, torch.load) and safetensors' Rust ones (its entry points patched)."""
    global _OPENED
    import safetensors
    import safetensors.torch

    if not getattr(sys, "_diffusers_quant_audit", False):
        sys.addaudithook(_audit)
        sys._diffusers_quant_audit = True
    opened: list[str] = []

    def recording(original):
        def call(path, *args, **kwargs):
            opened.append(str(path))
            return original(path, *args, **kwargs)

        return call

    for owner in (safetensors, safetensors.torch):
        monkeypatch.setattr(owner, "safe_open", recording(owner.safe_open))
    monkeypatch.setattr(safetensors.torch, "load_file", recording(safetensors.torch.load_file))
    _OPENED = opened
    yield lambda: [p for p in opened if p.lower().endswith(_WEIGHT_SUFFIXES)]
    _OPENED = None


REFUSED = "offload=balanced"  # quanto with balanced offload: refused by the rules for every component


@pytest.mark.parametrize(
    "entry",
    [
        "model from_pretrained",
        "model from_pretrained, saved quantized",
        "model from_pretrained, pickle weights",
        "model from_single_file",
        "model from_single_file, pickle",
        "model from_single_file, gguf",
        "transformers from_pretrained",
        "pipeline from_pretrained",
        "pipeline from_pretrained, a GGUF file in the plan",
        "pipeline from_single_file",
    ],
)
def test_every_entry_point_refuses_a_plan_before_opening_any_weight_file(
    entry, sd_path, tmp_path, weight_reads
):
    """Issue 14, finding 6: model-level loads read the weight file's header (or unpickled a .bin) before the
    rules refused the plan; now every entry point checks the plan first."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    unet_plan = f"unet=quanto:qint8;{REFUSED}"
    single = tmp_path / "unet.safetensors"
    if "single_file" in entry or "saved" in entry or "pickle" in entry:
        unet = UNet2DConditionModel.from_pretrained(sd_path, subfolder="unet")
        save_file(unet.state_dict(), str(single))
        if "saved" in entry:
            diffusers_quant.quantize(unet, "nncf:int8", kind="unet")
            diffusers_quant.save_quantized(unet, tmp_path / "saved")
        if "pickle" in entry:
            unet.save_pretrained(tmp_path / "pickled", safe_serialization=False)
            torch.save(unet.state_dict(), tmp_path / "unet.ckpt")
    gguf = tmp_path / "unet.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))  # refused before it is opened: its contents never matter
    loads = {
        "model from_pretrained": lambda: UNet2DConditionModel.from_pretrained(
            sd_path, subfolder="unet", quant=unet_plan
        ),
        "model from_pretrained, saved quantized": lambda: UNet2DConditionModel.from_pretrained(
            tmp_path / "saved", quant=f"saved=quanto:qint8;{REFUSED}"
        ),
        "model from_pretrained, pickle weights": lambda: UNet2DConditionModel.from_pretrained(
            tmp_path / "pickled", quant=f"pickled=quanto:qint8;{REFUSED}"
        ),
        "model from_single_file": lambda: UNet2DConditionModel.from_single_file(
            str(single), config=str(sd_path), subfolder="unet", quant=unet_plan
        ),
        "model from_single_file, pickle": lambda: UNet2DConditionModel.from_single_file(
            str(tmp_path / "unet.ckpt"), config=str(sd_path), subfolder="unet", quant=unet_plan
        ),
        "model from_single_file, gguf": lambda: UNet2DConditionModel.from_single_file(
            str(gguf), config=str(sd_path), subfolder="unet", quant=unet_plan
        ),
        "transformers from_pretrained": lambda: CLIPTextModel.from_pretrained(
            sd_path, subfolder="text_encoder", quant=f"text_encoder=quanto:qint8;{REFUSED}"
        ),
        "pipeline from_pretrained": lambda: StableDiffusionPipeline.from_pretrained(sd_path, quant=unet_plan),
        "pipeline from_pretrained, a GGUF file in the plan": lambda: StableDiffusionPipeline.from_pretrained(
            sd_path, quant=f"unet=gguf:{gguf},text_encoder=quanto:qint8;{REFUSED}"
        ),
        "pipeline from_single_file": lambda: StableDiffusionPipeline.from_single_file(
            str(single), config=str(sd_path), quant=unet_plan
        ),
    }
    diffusers_quant.install()
    before = weight_reads()
    with pytest.raises(PlanRefused, match=r"with (quanto:qint8|gguf:\S+), offload=balanced.*fix: "):
        loads[entry]()
    assert weight_reads() == before, f"{entry} opened weight files before refusing the plan"


@pytest.mark.parametrize("entry", ["model", "pipeline"])
def test_a_folder_saved_quantized_meets_the_offload_rules_before_any_weight_is_read(
    entry, sd_path, tmp_path, weight_reads
):
    """A plan with only an offload mode loads a saved quanto UNet as it is: quanto with balanced offload is
    refused for it as for a quanto spec, from its config.json, before a weight file is opened."""
    import shutil

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sd_path, subfolder="unet")
    diffusers_quant.quantize(unet, "quanto:qint8", kind="unet")
    pipeline = tmp_path / "pipeline"
    shutil.copytree(sd_path, pipeline)
    shutil.rmtree(pipeline / "unet")
    diffusers_quant.save_quantized(unet, pipeline / "unet")
    diffusers_quant.install()
    before = weight_reads()
    with pytest.raises(
        PlanRefused, match=r"unet \(unet\), saved quantized with quanto:qint8, offload=balanced.*fix: "
    ):
        if entry == "model":
            UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet", quant=REFUSED)
        else:
            StableDiffusionPipeline.from_pretrained(pipeline, quant=REFUSED)
    assert weight_reads() == before
    # allowed offload modes still load it as it was saved
    loaded = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet", quant="offload=none")
    assert type(loaded.down_blocks[0].attentions[0].proj_in).__name__ == "QLinear"
