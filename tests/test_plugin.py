"""An existing app, unchanged: app scripts that know nothing of this package (written like diffusers' example
scripts and like a UI's model loader) run in child processes under each way in: ``diffusers-quant run``,
``python -m diffusers_quant``, ``DIFFUSERS_QUANT`` alone with ``run``, and the autoload ``.pth`` hook. Each
child reports what its components are made of, and the image it made."""

from __future__ import annotations

import hashlib
import json
import os
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
