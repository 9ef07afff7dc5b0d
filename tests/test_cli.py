"""The command line: the README's main job, check, run, and its errors."""

import subprocess
import sys

import pytest
from PIL import Image

from diffusers_quant.cli import main


def test_generate_on_the_demo_writes_an_image_a_comparison_sheet_and_says_the_weights_are_random(
    tmp_path, capsys, flux_path
):
    out = tmp_path / "img.png"
    assert main(["generate", "--out", str(out), "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "transformer" in printed and "bnb:nf4" in printed and "on-load" in printed
    assert f"wrote {out.resolve()}" in printed
    assert Image.open(out).size == (64, 64)
    sheet = tmp_path / "img-compare.png"
    assert f"wrote {sheet.resolve()} (full precision | quantized | difference; rel-L2 0." in printed
    assert Image.open(sheet).width >= 3 * 64 and Image.open(sheet).height > 64
    assert "demo weights are random" in printed and "comparison sheet" in printed


def test_generate_on_a_demo_folder_uses_the_demo_size(tmp_path, capsys, flux_path):
    out = tmp_path / "folder.png"
    argv = ["generate", "--model", str(flux_path), "--steps", "1", "--no-compare", "--out", str(out)]
    assert main(argv) == 0
    assert Image.open(out).size == (64, 64)  # the pipeline's own default would be 256x256
    assert not (tmp_path / "folder-compare.png").exists()
    assert "demo weights are random" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "--steps", "0"], "argument --steps: expected a whole number >= 1, got 0"),
        (["generate", "--height", "-64"], "argument --height: expected a whole number >= 1, got -64"),
        (["generate", "--width", "wide"], "argument --width: expected a whole number >= 1, got 'wide'"),
    ],
)
def test_bad_numbers_exit_2_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


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
                "--no-compare",  # the flux test covers the sheet; this one the sd demo and post-load
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
        (
            ["generate", "--quant", "model=bnb:nf4;ofload=model"],
            "unknown setting 'ofload'; expected one of mode, offload, device, dtype, gpu_memory, max_memory, "
            "group_type, group_blocks, stream, record_stream, low_cpu_mem_usage, compute; "
            "did you mean 'offload'?",
        ),
        # --out is checked against the format before the model is even looked at
        (
            ["quantize", "/nonexistent", "--quant", "gguf:q8_0", "--out", "t.safetensors"],
            "--out 't.safetensors': a gguf spec writes one GGUF file; fix: --out t.gguf",
        ),
        (
            ["quantize", "/nonexistent", "--quant", "nncf:int8", "--out", "t.gguf"],
            "--out 't.gguf': nncf:int8 is saved as a folder (config.json + safetensors), not one file; "
            "fix: --out t (a new folder)",
        ),
        (
            ["quantize", "/nonexistent", "--quant", "bnb:int8", "--out", "t.safetensors"],
            "fix: --out t (a new folder), or one of the single-file specs",
        ),
        (
            ["quantize", "/nonexistent", "--quant", "bnb:nf4", "--out", "t.gguf"],
            "--out 't.gguf': --quant bnb:nf4 writes one Forge safetensors file; fix: e.g. --out t-nf4.safetensors",
        ),
        (
            ["quantize", "/nonexistent", "--quant", "bnb:nf4", "--out", "t", "--dtype", "fp8"],
            "unknown dtype 'fp8'",
        ),
        (["inspect", "/nonexistent/x.gguf"], "'/nonexistent/x.gguf' does not exist"),
        (
            ["generate", "--out", "image.txt"],
            "--out 'image.txt': not an image file name; fix: end it with .png",
        ),
    ],
)
def test_errors_name_the_fix(argv, message, capsys, tmp_path):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_quantize_refuses_an_occupied_out_folder_before_loading(tmp_path, capsys, flux_path, monkeypatch):
    import diffusers_quant.cli as cli

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    monkeypatch.setattr(cli, "_model_class", lambda folder: pytest.fail("the model was looked at first"))
    assert main(["quantize", str(flux_path), "--quant", "bnb:nf4", "--out", str(tmp_path / "out")]) == 2
    assert "already exists and is not an empty folder; fix: name a new folder" in capsys.readouterr().err


def test_quantize_bnb_saves_a_folder_that_loads_pre_quantized(tmp_path, capsys, flux_path):
    out = tmp_path / "transformer-nf4"
    assert main(["quantize", str(flux_path), "--quant", "bnb:nf4", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "quantized component" in printed and "quantized layers (bnb)" in printed


def test_check_refuses_a_gguf_file_that_does_not_exist(tmp_path, capsys, flux_path):
    missing = tmp_path / "nope.gguf"
    assert main(["check", "--quant", f"transformer=gguf:{missing}"]) == 1
    assert f"GGUF file {str(missing)!r} does not exist" in capsys.readouterr().out
    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_bytes(b"not a gguf file at all")
    assert main(["check", "--quant", f"transformer=gguf:{not_gguf}"]) == 1
    assert "is not a GGUF file" in capsys.readouterr().out


def test_check_selects_components_by_exact_name(capsys, flux_path):
    assert main(["check", "--quant", "text_encoder=quanto:qint8"]) == 0
    rows = dict(
        line.split()[::2] for line in capsys.readouterr().out.splitlines() if line.startswith("text_")
    )
    assert rows == {"text_encoder": "quanto:qint8", "text_encoder_2": "-"}
    assert main(["check", "--quant", "text_encoders=quanto:qint8"]) == 0
    rows = dict(
        line.split()[::2] for line in capsys.readouterr().out.splitlines() if line.startswith("text_")
    )
    assert rows == {"text_encoder": "quanto:qint8", "text_encoder_2": "quanto:qint8"}


def test_inspect_says_what_a_file_is(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    random = tmp_path / "random.bin"
    random.write_bytes(bytes(range(256)) * 4)
    assert main(["inspect", str(random)]) == 2
    assert "is neither a GGUF nor a safetensors file" in capsys.readouterr().err
    plain = tmp_path / "plain.safetensors"
    save_file({"a.weight": torch.zeros(4, 4)}, str(plain))
    assert main(["inspect", str(plain)]) == 0
    printed = capsys.readouterr().out
    assert "safetensors: 1 tensors" in printed and "F32 x1" in printed and "plain checkpoint" in printed
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a model or pipeline folder" in capsys.readouterr().err


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
