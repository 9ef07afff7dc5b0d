"""An existing app, unchanged: app scripts that know nothing of this package (written like diffusers' example
scripts and like a UI's model loader) run in child processes under each way in: ``diffusers-quant run``,
``python -m diffusers_quant``, ``DIFFUSERS_QUANT`` alone with ``run``, and the autoload ``.pth`` hook. Each
child reports what its components are made of, and the image it made."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from diffusers_quant import plugin

EXAMPLE_SCRIPT = textwrap.dedent(
    """
    # like diffusers' example scripts: argparse, one pipeline load, one call
    import argparse, json, sys
    import torch
    from diffusers import DiffusionPipeline

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--report", required=True)
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args()
    pipe = DiffusionPipeline.from_pretrained(args.model, dtype=torch.bfloat16)
    image = pipe("a cat", num_inference_steps=args.steps, height=32, width=32, output_type="np").images[0]
    layers = lambda m: sorted({type(x).__name__ for x in m.modules() if "Linear" in type(x).__name__})
    with open(args.report, "w") as f:
        json.dump({
            "transformer": layers(pipe.transformer),
            "text_encoder_2": layers(pipe.text_encoder_2),
            "image": list(image.shape),
            "finite": bool((image == image).all()),
            "argv": sys.argv[1:],
            "hooks_imported": "diffusers_quant" in sys.modules,
        }, f)
    """
)

UI_LOADER = textwrap.dedent(
    """
    # like a UI's model loader: components loaded on their own, then passed in; a module run with -m too
    import json, os, sys
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import T5EncoderModel

    model, report = sys.argv[1], sys.argv[2]
    transformer = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer", dtype=torch.bfloat16)
    encoder = T5EncoderModel.from_pretrained(os.path.join(model, "text_encoder_2"), dtype=torch.bfloat16)
    pipe = FluxPipeline.from_pretrained(model, transformer=transformer, text_encoder_2=encoder, dtype=torch.bfloat16)
    if len(sys.argv) > 3:  # a LoRA, loaded after the pipeline, as UIs do
        pipe.load_lora_weights(sys.argv[3], adapter_name="style")
    image = pipe("a cat", num_inference_steps=1, height=32, width=32, output_type="np").images[0]
    layers = lambda m: sorted({type(x).__name__ for x in m.modules() if "Linear" in type(x).__name__})
    with open(report, "w") as f:
        json.dump({"transformer": layers(pipe.transformer), "text_encoder_2": layers(encoder),
                   "image": list(image.shape), "finite": bool((image == image).all()),
                   "adapters": pipe.get_active_adapters(),
                   "lora_layers": sum(hasattr(x, "lora_A") for x in pipe.transformer.modules())}, f)
    """
)


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    folder = tmp_path_factory.mktemp("apps")
    (folder / "example.py").write_text(EXAMPLE_SCRIPT)
    (folder / "ui_loader.py").write_text(UI_LOADER)
    return folder


def _child(cmd: list[str], env_extra: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFUSERS_QUANT")}
    env.update(DIFFUSERS_QUANT_PROGRESS="0", **(env_extra or {}))
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("diffusers-quant")
    return [str(script)] if script.exists() else [sys.executable, "-m", "diffusers_quant"]


def _report(path: Path, proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(path.read_text())


def test_run_with_a_plan_quantizes_an_unchanged_example_script(apps, flux_path, tmp_path):
    out = tmp_path / "r.json"
    proc = _child(
        [
            *_cli(),
            "run",
            "--quant",
            "transformer=bnb:nf4,text_encoder_2=quanto:qint8",
            str(apps / "example.py"),
        ]
        + ["--model", str(flux_path), "--report", str(out), "--steps", "1"]
    )
    report = _report(out, proc)
    assert "Linear4bit" in report["transformer"] and "QLinear" in report["text_encoder_2"]
    assert report["image"] == [32, 32, 3] and report["finite"]
    # the app got its own argv, its --flags too
    assert report["argv"] == ["--model", str(flux_path), "--report", str(out), "--steps", "1"]
    # one line per quantized load on stderr, nothing of the full report unless asked
    assert "diffusers-quant: transformer: bnb:nf4 (on-load)" in proc.stderr
    assert "diffusers-quant: text_encoder_2: quanto:qint8" in proc.stderr
    assert "component  spec" not in proc.stderr


def test_python_m_takes_the_plan_from_the_environment_and_prints_the_report_when_verbose(
    apps, flux_path, tmp_path
):
    out = tmp_path / "r.json"
    proc = _child(
        [sys.executable, "-m", "diffusers_quant", str(apps / "example.py"), "--model", str(flux_path)]
        + ["--report", str(out)],
        {"DIFFUSERS_QUANT": "transformer=quanto:qint8", "DIFFUSERS_QUANT_VERBOSE": "1"},
    )
    report = _report(out, proc)
    assert "QLinear" in report["transformer"] and "QLinear" not in report["text_encoder_2"]
    assert "component" in proc.stderr and "quanto:qint8" in proc.stderr  # the whole report


def _lora_file(flux_path, path) -> None:
    """A LoRA in diffusers' format for the demo transformer's attention queries."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    model = FluxTransformer2DModel.from_pretrained(flux_path, subfolder="transformer")
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, module in model.named_modules():
        if name.endswith("attn.to_q"):
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=g) * 0.1
            state[f"transformer.{name}.lora_B.weight"] = (
                torch.randn(module.out_features, 4, generator=g) * 0.1
            )
    save_file(state, str(path))


def test_run_without_a_plan_uses_the_default_and_runs_modules_that_load_loras(apps, flux_path, tmp_path):
    out, lora = tmp_path / "r.json", tmp_path / "style.safetensors"
    _lora_file(flux_path, lora)
    proc = _child([*_cli(), "run", "-m", "ui_loader", str(flux_path), str(out), str(lora)], cwd=apps)
    report = _report(out, proc)
    # the default plan (model=bnb:nf4): the transformer loaded on its own is quantized, the encoder is not;
    # the LoRA loaded after the pipeline sits on the 4-bit layers
    assert "Linear4bit" in report["transformer"] and report["text_encoder_2"] == ["Linear"]
    assert report["adapters"] == ["style"] and report["lora_layers"] > 0
    assert report["finite"]


def test_a_bad_plan_stops_the_app_before_it_starts(apps, flux_path, tmp_path):
    out = tmp_path / "r.json"
    proc = _child(
        [*_cli(), "run", str(apps / "example.py"), "--model", str(flux_path), "--report", str(out)],
        {"DIFFUSERS_QUANT": "transformer=bnb:nf5"},
    )
    assert proc.returncode == 2 and not out.exists()
    assert "unknown qtype 'nf5'" in proc.stderr and "grammar: pattern=backend:qtype" in proc.stderr


def _site_snapshot(site: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(site.iterdir()) if p.is_file()}


def _autoload_child(site: Path, app: Path, argv: list[str], env: dict) -> subprocess.CompletedProcess:
    # site.addsitedir reads a folder's .pth files exactly as interpreter start-up reads site-packages'
    boot = (
        "import site, sys, runpy; site.addsitedir(sys.argv[1]); "
        "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    return _child([sys.executable, "-c", boot, str(site), str(app), *argv], env)


def test_autoload_installs_the_hooks_only_where_the_variable_is_set(apps, flux_path, tmp_path):
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "other.pth").write_text("# another package's\n")
    before = _site_snapshot(site)
    path = plugin.autoload_enable(site)
    assert path.name == plugin.PTH_NAME and plugin.autoload_status(site) == (True, path)
    out = tmp_path / "on.json"
    argv = ["--model", str(flux_path), "--report", str(out)]
    proc = _autoload_child(site, apps / "example.py", argv, {"DIFFUSERS_QUANT": "transformer=bnb:nf4"})
    assert "Linear4bit" in _report(out, proc)["transformer"]
    assert "diffusers-quant: transformer: bnb:nf4" in proc.stderr
    off = tmp_path / "off.json"
    proc = _autoload_child(site, apps / "example.py", ["--model", str(flux_path), "--report", str(off)], {})
    report = _report(off, proc)
    # unset: nothing quantized, and the package was never imported
    assert report["transformer"] == ["Linear"] and not report["hooks_imported"]
    bad = _autoload_child(site, apps / "example.py", argv, {"DIFFUSERS_QUANT": "transformer="})
    assert bad.returncode == 2 and "bad DIFFUSERS_QUANT" in bad.stderr and "grammar:" in bad.stderr
    plugin.autoload_disable(site)
    assert plugin.autoload_status(site) == (False, path)
    assert _site_snapshot(site) == before  # byte for byte, listing and hashes


def test_autoload_leaves_a_foreign_file_of_its_name_alone(tmp_path):
    from diffusers_quant.errors import QuantError

    (tmp_path / plugin.PTH_NAME).write_text("import something_else\n")
    with pytest.raises(QuantError, match="is not this package's autoload line"):
        plugin.autoload_disable(tmp_path)
    with pytest.raises(QuantError, match="not this package's autoload line"):
        plugin.autoload_enable(tmp_path)
    assert (tmp_path / plugin.PTH_NAME).read_text() == "import something_else\n"


def test_the_apps_own_quantization_config_wins_and_is_reported(flux_path):
    import torch
    from diffusers import FluxTransformer2DModel, QuantoConfig

    import diffusers_quant

    diffusers_quant.install("transformer=bnb:nf4")
    try:
        model = FluxTransformer2DModel.from_pretrained(
            flux_path,
            subfolder="transformer",
            dtype=torch.bfloat16,
            quantization_config=QuantoConfig(weights_dtype="int8"),
        )
    finally:
        diffusers_quant.uninstall()
    kinds = {type(m).__name__ for m in model.modules()}
    assert "QLinear" in kinds and "Linear4bit" not in kinds  # quantized once, by the app's config
    row = model.quant_report["transformer"]
    assert row.mode == "native" and row.spec == "quanto (the app's quantization_config)"


def test_run_names_what_is_missing(capsys, tmp_path, monkeypatch):
    from diffusers_quant.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["run"]) == 2
    assert "give the app's script or -m module.name" in capsys.readouterr().err
    assert main(["run", "-m", "no_such_app_module"]) == 2
    assert "-m no_such_app_module: no module of that name here" in capsys.readouterr().err
    assert main(["run", "--quant", "transformer=bnb:nf4", str(tmp_path / "missing.py")]) == 2
    assert "is not a file" in capsys.readouterr().err


# --- the other ways real apps load: app scripts in tests/apps/, each run under one way in ------------------

APPS = Path(__file__).parent / "apps"


def _report_rows(stderr: str) -> dict[str, list[str]]:
    """The rows of the report printed with DIFFUSERS_QUANT_VERBOSE=1: name -> [spec, mode, layers]."""
    lines = re.split(r"[\r\n]", stderr)
    rows = {}
    for i, line in enumerate(lines[:-1]):
        if line.startswith("component  ") and set(lines[i + 1]) == {"-", " "}:
            for row in lines[i + 2 :]:
                fields = row.split()
                if len(fields) != 11:  # the sizes are "1.26 MiB"
                    break
                rows[fields[0]] = fields[1:4]
    return rows


@pytest.fixture(scope="module")
def controlnets(sd_path, tmp_path_factory):
    """Two ControlNets made from the demo SD UNet (as diffusers' training script starts one), saved as
    downloaded ControlNets are: folders whose names are not the pipeline's component name."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sd_path, subfolder="unet")
    folder = tmp_path_factory.mktemp("controlnets")
    paths = []
    for seed, name in enumerate(("canny-controlnet", "depth-controlnet")):
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
        for p in net.controlnet_down_blocks.parameters():  # trained zero convolutions are not zero
            torch.nn.init.normal_(p, std=0.02)
        net.save_pretrained(folder / name)
        paths.append(folder / name)
    return paths


def test_the_default_plan_leaves_a_controlnet_passed_in_full_precision_and_says_so(sd_path, controlnets):
    """The default plan (model=bnb:nf4) is the UNet / transformer: a ControlNet loaded on its own and passed
    in is left as it is, and the report says so: of two passed as a list (one quantized by its own call's
    plan), one row saying what each net is."""
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    import diffusers_quant

    diffusers_quant.install(plugin.resolve_plan(None, "cli"))  # what `diffusers-quant run app.py` installs
    bf16 = {"dtype": torch.bfloat16}
    net = ControlNetModel.from_pretrained(controlnets[0], **bf16)
    quantized = ControlNetModel.from_pretrained(controlnets[1], quant="controlnet=quanto:qint8", **bf16)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(sd_path, controlnet=[quantized, net], **bf16)
    assert {type(m).__name__ for m in net.modules()}.isdisjoint({"Linear4bit", "QLinear"})
    assert not hasattr(net, "quant_report") and pipe.quant_report["unet"].spec == "bnb:nf4"
    row, own = pipe.quant_report["controlnet"], quantized.quant_report["depth-controlnet"]
    assert (row.spec, row.mode, row.class_name) == (
        "quanto:qint8+none",
        "on-load+none",
        "MultiControlNetModel",
    )
    assert row.layers_quantized == own.layers_quantized > 0 and row.linears_total == 2 * own.linears_total
    assert row.bytes_before - row.bytes_after == own.bytes_before - own.bytes_after > 0


def test_a_plan_naming_controlnet_quantizes_each_of_several_controlnets(sd_path, controlnets, tmp_path):
    """A plan naming controlnet= quantizes each ControlNet the app loads on its own (by kind: their folders
    are called otherwise), also when the app passes them as a list; the report has one row adding up both."""
    site = tmp_path / "site-packages"
    site.mkdir()
    plugin.autoload_enable(site)
    out = tmp_path / "r.json"
    argv = ["--model", str(sd_path), "--report", str(out)]
    argv += [a for path in controlnets for a in ("--controlnet", str(path))]
    plan = {"DIFFUSERS_QUANT": "unet=bnb:nf4,controlnet=quanto:qint8", "DIFFUSERS_QUANT_VERBOSE": "1"}
    proc = _autoload_child(site, APPS / "controlnet.py", argv, plan)
    report = _report(out, proc)
    assert all("QLinear" in net for net in report["nets"]) and "Linear4bit" in report["unet"]
    assert report["image"] == [32, 32, 3] and report["finite"]
    # each announce line on a line of its own, also the UNet's, printed while diffusers draws its
    # "Loading pipeline components" bar
    lines = re.split(r"[\r\n]", proc.stderr)
    for line in (
        "diffusers-quant: canny-controlnet: quanto:qint8 (on-load)",
        "diffusers-quant: depth-controlnet: quanto:qint8 (on-load)",
        "diffusers-quant: unet: bnb:nf4 (on-load)",
    ):
        assert any(x.startswith(line) for x in lines), line
    assert "Loading pipeline components" in proc.stderr
    rows = _report_rows(proc.stderr)
    spec, mode, layers = rows["controlnet"]
    quantized, total = map(int, layers.split("/"))
    assert (spec, mode) == ("quanto:qint8", "on-load") and quantized > total / 2 and quantized % 2 == 0


def test_a_community_pipeline_from_a_local_file_is_quantized(sd_path, tmp_path):
    """DiffusionPipeline.from_pretrained(model, custom_pipeline=<a local .py file>): the app's own pipeline
    class, built from the folder's components, quantized as the plan says."""
    out = tmp_path / "r.json"
    proc = _child(
        [sys.executable, "-m", "diffusers_quant", str(APPS / "community.py"), "--model", str(sd_path)]
        + ["--report", str(out)],
        {
            "DIFFUSERS_QUANT": "unet=bnb:nf4,text_encoder=quanto:qint8",
            "DIFFUSERS_QUANT_VERBOSE": "1",
            "HF_MODULES_CACHE": str(tmp_path / "modules"),  # where diffusers copies the pipeline's code
        },
    )
    report = _report(out, proc)
    assert report["pipeline"] == "TwoStepTextToImage"
    assert "Linear4bit" in report["unet"] and "QLinear" in report["text_encoder"]
    assert report["image"] == [32, 32, 3] and report["finite"]
    rows = _report_rows(proc.stderr)
    assert rows["unet"][:2] == ["bnb:nf4", "on-load"] and rows["text_encoder"][:2] == [
        "quanto:qint8",
        "on-load",
    ]
    assert rows["vae"][:2] == ["-", "none"]


@pytest.fixture(scope="module")
def sd_checkpoint(sd_path, tmp_path_factory):
    """The demo SD pipeline as one original-layout file (as SD 1.x checkpoints are downloaded) and a LoRA for
    its UNet in diffusers' format."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from sd_original import write_checkpoint

    folder = tmp_path_factory.mktemp("checkpoints")
    write_checkpoint(sd_path, folder / "tiny-sd-v1.safetensors")
    unet = UNet2DConditionModel.from_pretrained(sd_path, subfolder="unet")
    g = torch.Generator().manual_seed(0)
    lora = {}
    for name, m in unet.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_v", "attn2.to_q")):
            lora[f"unet.{name}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g) * 0.1
            lora[f"unet.{name}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.1
    save_file(lora, str(folder / "style-lora.safetensors"))
    return folder / "tiny-sd-v1.safetensors", folder / "style-lora.safetensors"


def test_the_original_layout_test_checkpoint_is_the_demo_pipeline(sd_path, sd_checkpoint):
    """The file is what the single-file test claims: diffusers' own converters make the demo's weights of it."""
    from diffusers import StableDiffusionPipeline
    from sd_original import same_weights

    single = StableDiffusionPipeline.from_single_file(str(sd_checkpoint[0]), config=str(sd_path))
    folder = StableDiffusionPipeline.from_pretrained(sd_path)
    for name in ("unet", "vae", "text_encoder"):
        assert same_weights(getattr(single, name), getattr(folder, name)), name


def test_a_single_file_app_with_a_lora_after_load_is_quantized(sd_path, sd_checkpoint, tmp_path):
    """StableDiffusionPipeline.from_single_file(checkpoint) then load_lora_weights, as a UI does: the default
    plan quantizes the UNet after diffusers' converters ran, the LoRA sits on its 4-bit layers."""
    checkpoint, lora = sd_checkpoint
    out = tmp_path / "r.json"
    proc = _child(
        [*_cli(), "run", str(APPS / "single_file.py"), str(checkpoint), "--config", str(sd_path)]
        + ["--report", str(out), "--lora", str(lora)],
        {"DIFFUSERS_QUANT_VERBOSE": "1"},
    )
    report = _report(out, proc)
    assert "Linear4bit" in report["unet"] and report["text_encoder"] == ["Linear"]
    assert report["adapters"] == ["lora0"] and report["lora_layers"] == 12
    assert report["image"] == [32, 32, 3] and report["finite"]
    assert "diffusers-quant: unet: bnb:nf4 (post-load)" in proc.stderr
    rows = _report_rows(proc.stderr)
    assert rows["unet"][:2] == ["bnb:nf4", "post-load"] and rows["text_encoder"][:2] == ["-", "none"]


def test_a_single_file_pipeline_with_a_controlnet_passed_in_keeps_the_controlnets_own_load(
    sd_path, sd_checkpoint, controlnets
):
    """StableDiffusionControlNetPipeline.from_single_file(checkpoint, controlnet=net) under a plan naming
    controlnet=: not refused as a pattern matching nothing, and the net (quantized by its own load) is not
    quantized again after the pipeline's load, so its row is its own load's."""
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    import diffusers_quant

    diffusers_quant.install("unet=bnb:nf4,controlnet=quanto:qint8")
    net = ControlNetModel.from_pretrained(controlnets[0], dtype=torch.bfloat16)
    own = dataclasses.replace(net.quant_report["canny-controlnet"], name="controlnet")
    pipe = StableDiffusionControlNetPipeline.from_single_file(
        str(sd_checkpoint[0]), config=str(sd_path), controlnet=net, dtype=torch.bfloat16
    )
    assert pipe.quant_report["controlnet"] == own and own.mode == "on-load" and own.layers_quantized > 0
    assert pipe.quant_report["unet"].mode == "post-load"


@pytest.mark.gpu
@pytest.mark.parametrize("placement", [["--offload"], ["--device", "cuda"]], ids=["model-offload", "to-cuda"])
def test_a_single_file_app_that_offloads_after_the_lora_runs_on_the_gpu(
    sd_path, sd_checkpoint, tmp_path, placement
):
    """The same app calling pipe.enable_model_cpu_offload() (diffusers refuses it without an accelerator:
    "requires accelerator, but not found"), or pipe.to("cuda"), after the LoRA: the UNet quantized on the
    CPU by the default plan moves to the GPU as it is and generates."""
    checkpoint, lora = sd_checkpoint
    out = tmp_path / "r.json"
    proc = _child(
        [*_cli(), "run", str(APPS / "single_file.py"), str(checkpoint), "--config", str(sd_path)]
        + ["--report", str(out), "--lora", str(lora), *placement]
    )
    report = _report(out, proc)
    assert "Linear4bit" in report["unet"] and report["lora_layers"] == 12
    assert report["offloaded"] == (placement == ["--offload"]) and report["ran_on"].startswith("cuda")
    # offloaded: the UNet is back on the CPU after its turn; else it stays on the GPU
    assert report["unet_on"].startswith("cpu" if report["offloaded"] else "cuda")
    assert report["image"] == [32, 32, 3] and report["finite"]
