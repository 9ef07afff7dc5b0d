"""The command line: the README's main job, check, run, and its errors."""

import subprocess
import sys

import pytest
from PIL import Image

from diffusers_quant.cli import main


def test_generate_on_the_demo_writes_an_image_and_prints_the_report(tmp_path, capsys, flux_path):
    out = tmp_path / "img.png"
    assert main(["generate", "--out", str(out), "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "transformer" in printed and "bnb:nf4" in printed and "on-load" in printed
    assert f"wrote {out.resolve()}" in printed
    assert Image.open(out).size == (64, 64)


def test_generate_sd_demo_post_load_with_nncf(tmp_path, capsys, sd_path):
    out = tmp_path / "sd.png"
    assert (
        main(
            [
                "generate",
                "--demo",
                "sd",
                "--quant",
                "unet=nncf:int8",
                "--mode",
                "post-load",
                "--steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "post-load" in capsys.readouterr().out and out.exists()


def test_check_reports_refusals_without_loading(capsys, flux_path):
    assert main(["check", "--quant", "transformer=quanto:qint4;offload=balanced;device=cuda"]) == 1
    printed = capsys.readouterr().out
    assert (
        "balanced offload is allowed only for bnb and NNCF" in printed and "fix: use offload=model" in printed
    )
    assert main(["check", "--quant", "transformer=quanto:qint4"]) == 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "--model", "/nonexistent/pipe"], "does not exist; give a local pipeline folder"),
        (
            ["generate", "--quant", "transformer=bnbb:nf4"],
            "unknown backend 'bnbb'; expected one of bnb, gguf, nncf, quanto",
        ),
        (["quantize", "/nonexistent", "--quant", "gguf:q8_0", "--out", "x.gguf"], "does not exist"),
    ],
)
def test_errors_name_the_fix(argv, message, capsys, tmp_path):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_run_wraps_an_app_with_the_hooks(tmp_path, flux_path):
    app = tmp_path / "app.py"
    app.write_text(
        "import sys, torch\n"
        "from diffusers import FluxTransformer2DModel\n"
        f"m = FluxTransformer2DModel.from_pretrained({str(flux_path / 'transformer')!r})\n"
        "print('LAYER', type(m.transformer_blocks[0].attn.to_q).__name__, sys.argv[1:])\n"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffusers_quant.cli",
            "run",
            "--quant",
            "transformer=quanto:qint8",
            str(app),
            "--flag",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "LAYER QLinear ['--flag']" in out.stdout
