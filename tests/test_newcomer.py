"""What a newcomer meets first (issue 15): names select exactly, paths are checked, bitsandbytes' noise is
quiet, files get normal permissions, and the docs' messages are the real ones."""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

import pytest
import torch

import diffusers_quant
from diffusers_quant import Plan, QuantError, Spec, SpecError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_pipeline_load_quantizes_only_the_component_named(flux_path):
    from diffusers import DiffusionPipeline

    diffusers_quant.install()
    pipe = DiffusionPipeline.from_pretrained(flux_path, quant="text_encoder=quanto:qint8")
    report = pipe.quant_report
    assert report["text_encoder"].spec == "quanto:qint8" and report["text_encoder"].layers_quantized > 0
    assert report["text_encoder_2"].spec is None and report["text_encoder_2"].mode == "none"


def test_plan_with_a_missing_gguf_file_is_refused_before_loading(flux_path, tmp_path):
    from diffusers import DiffusionPipeline

    diffusers_quant.install()
    missing = tmp_path / "flux-Q4_0.gguf"
    with pytest.raises(
        diffusers_quant.PlanRefused, match=re.escape(f"GGUF file {str(missing)!r} does not exist")
    ):
        DiffusionPipeline.from_pretrained(flux_path, quant=f"transformer=gguf:{missing}")


@pytest.mark.parametrize("path", ["/missing/flux1-dev-Q4_0.gguf", "./missing.safetensors", "model.ckpt"])
def test_from_single_file_names_a_missing_local_file(path):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    diffusers_quant.install()
    message = re.escape(f"from_single_file: {path!r} does not exist")
    with pytest.raises(QuantError, match=message):
        FluxTransformer2DModel.from_single_file(path)
    with pytest.raises(QuantError, match=message):
        FluxPipeline.from_single_file(path)


def _reset_int8_explanation():
    # The explanation is said once per process; other tests may have used bnb:int8 already.
    for f in logging.getLogger("bitsandbytes.autograd._functions").filters:
        if hasattr(f, "int8_explained"):
            f.int8_explained = False


@pytest.mark.parametrize("forward", ["weight-only", "llm.int8"])
def test_bnb_int8_cast_is_explained_once_not_logged_per_matmul(forward, flux_path, caplog, monkeypatch):
    """bitsandbytes' LLM.int8 (the int8 layers' forward with the fused path off) logs a cast on every matmul:
    said once, as ours; the weight-only forward casts nothing and says nothing."""
    from transformers import T5EncoderModel

    from diffusers_quant import fused

    monkeypatch.delenv(fused.REFERENCE_ENV, raising=False)
    monkeypatch.setenv(fused.FUSED_ENV, "all" if forward == "weight-only" else "none")
    diffusers_quant.install()
    _reset_int8_explanation()
    caplog.set_level(logging.WARNING)
    encoder = T5EncoderModel.from_pretrained(
        flux_path / "text_encoder_2", dtype=torch.bfloat16, quant="text_encoder_2=bnb:int8"
    )
    with torch.no_grad():
        for _ in range(3):
            encoder(torch.tensor([[4, 5, 6, 1]]))
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("bitsandbytes")]
    assert not any("inputs will be cast" in m for m in messages)
    if forward == "weight-only":
        assert messages == []
        return
    assert len(messages) == 1 and "bnb:int8 layers compute in float16" in messages[0]
    assert "torch.bfloat16" in messages[0] and "nothing to do" in messages[0]


def test_bnb_kernel_fallback_message_is_silenced_and_others_pass(caplog):
    import diffusers_quant.backends  # noqa: F401  (registering the bnb backend installs the filter)

    caplog.set_level(logging.WARNING)
    ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    ops.warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
        "`pip install kernels` and the kernels >= 0.11.1",
        "no network",
    )
    ops.warning("something else bitsandbytes says")
    assert [r.getMessage() for r in caplog.records if r.name == ops.name] == [
        "something else bitsandbytes says"
    ]


def test_report_of_a_load_without_a_plan_says_so():
    from diffusers_quant.report import ComponentReport, Report

    row = ComponentReport(
        "transformer", "transformer", "FluxTransformer2DModel", "nncf:int8", "pre-quantized", 4, 2
    )
    assert str(Report(components=[row])).splitlines()[0] == "plan: (none: pre-quantized)"
    plain = ComponentReport("vae", "vae", "AutoencoderKL", None, "none", 4, 4)
    assert str(Report(components=[plain])).splitlines()[0] == "plan: (none)"
    assert str(Report(components=[row], plan="transformer=nncf:int8")).splitlines()[0].endswith("nncf:int8")


def test_readme_error_examples_are_the_real_messages():
    readme = README.read_text()
    with pytest.raises(SpecError) as backend:
        Spec.parse("bnbb:nf4")
    with pytest.raises(SpecError) as setting:
        Plan.parse("transformer=bnb:nf4;ofload=model")
    for error in (backend, setting):
        assert f"`{error.value}`" in readme, f"README must quote the real message: {error.value}"


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def saved_folder(flux_path, tmp_path, umask_022):
    from diffusers import FluxTransformer2DModel

    diffusers_quant.install()
    model = FluxTransformer2DModel.from_pretrained(flux_path / "transformer", quant="transformer=bnb:nf4")
    return Path(diffusers_quant.save_quantized(model, tmp_path / "saved"))


def test_saved_folder_and_gguf_file_get_normal_modes(saved_folder, tmp_path):
    from diffusers_quant.backends.gguf.writer import write_gguf

    assert _mode(saved_folder) == 0o755
    path = tmp_path / "model.gguf"
    write_gguf(path, {"blocks.0.linear.weight": torch.randn(64, 64)}, "Q8_0", arch="x")
    assert _mode(path) == 0o644  # mkstemp alone would leave it 0600


def test_saved_files_get_normal_modes(saved_folder):
    files = [p for p in saved_folder.rglob("*") if p.is_file()]
    assert files and {p.name: _mode(p) for p in files} == {p.name: 0o644 for p in files}
