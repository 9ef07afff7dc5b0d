"""The benchmark harness end to end on the tiny demo transformer: bf16, one of our rows and one plain-diffusers
row, each in its own subprocess, into a temporary folder."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "bench.py"
ROWS = ("bf16", "ours/quanto:qint8/on-load", "plain/quanto:qint8")


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def empty_home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, flux_path, empty_home):
    out = tmp_path_factory.mktemp("bench")
    cmd = [
        sys.executable,
        str(BENCH),
        "--device",
        "cpu",
        "--model",
        "tiny",
        "--rows",
        ",".join(ROWS[1:]),
        "--out",
        str(out),
    ]
    with pytest.MonkeyPatch.context() as mp:
        # A run must write only where it is told: HOME points at an empty folder (checked below).
        mp.setenv("HOME", str(empty_home))
        mp.delenv("XDG_CACHE_HOME", raising=False)
        mp.setenv("MPLCONFIGDIR", str(tmp_path_factory.mktemp("matplotlib")))  # matplotlib's own font cache
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_bench_run_writes_nothing_under_home(bench_run, empty_home):
    assert sorted(str(p.relative_to(empty_home)) for p in empty_home.rglob("*")) == []


def test_worker_bytecode_cache_follows_the_cache_folder(monkeypatch, tmp_path):
    # With bytecode off (a clean CI checkout) the workers cache it; where is what matters, not a real run
    # (compiling torch into an empty cache would double the benchmark test's time).
    bench = _bench_module()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setenv("DIFFUSERS_QUANT_CACHE", str(tmp_path / "cache"))
    assert bench._worker_env()["PYTHONPYCACHEPREFIX"] == str(tmp_path / "cache" / "pycache")


def test_results_json_has_the_rows_with_finite_figures(bench_run):
    out, _ = bench_run
    data = json.loads((out / "results.json").read_text())
    rows = {r["id"]: r for r in data["rows"]}
    assert set(rows) == set(ROWS)
    for row in rows.values():
        assert row["status"] == "ok", row.get("note")
        for key in (
            "load_s",
            "step_ms",
            "model_bytes",
            "checkpoint_bytes",
            "step_ratio",
            "mem_ratio",
            "load_ratio",
        ):
            assert math.isfinite(row[key]) and row[key] > 0, (row["id"], key, row[key])
        assert row["host_peak_growth"] >= 0
    assert rows["bf16"]["rel_l2"] == 0
    for rid in ROWS[1:]:
        assert 0 < rows[rid]["rel_l2"] < 0.5
        assert rows[rid]["mem_ratio"] < 1  # quantized weights take less memory than bf16
    # ours is checked against plain diffusers of the same format
    assert rows["ours/quanto:qint8/on-load"]["plain_rel_l2"] == rows["plain/quanto:qint8"]["rel_l2"]
    assert data["machine"]["cpu_cores"] >= 1 and data["machine"]["versions"]["torch"]


def test_markdown_table_and_chart(bench_run):
    out, stdout = bench_run
    md = (out / "results.md").read_text()
    assert "| row | load s |" in md
    for rid in ROWS:
        assert f"| {rid} |" in md
    assert "## Ours vs plain diffusers" in md
    assert md.strip() in stdout  # the table is printed too
    assert (out / "chart.png").stat().st_size > 1000


def test_row_selection_and_machine_names():
    bench = _bench_module()
    rows = bench.all_rows()
    ids = [r.id for r in rows]
    assert ids[0] == "bf16" and "ours/quanto:qint8/on-load" in ids and "plain/bnb:nf4" in ids
    picked = bench.select_rows(rows, quick=False, patterns="ours/bnb:*")
    assert [r.id for r in picked][0] == "bf16" and all(r.id.startswith("ours/bnb:") for r in picked[1:])
    assert {r.id for r in bench.select_rows(rows, quick=True, patterns=None)} <= set(bench.QUICK_ROWS)
    assert bench.machine_slug("cuda", "NVIDIA H100 80GB HBM3") == "nvidia-h100"
    assert bench.machine_slug("cuda", "NVIDIA A100-SXM4-80GB") == "nvidia-a100"
    assert bench.machine_slug("cpu", None).startswith("cpu-")


def test_offload_benchmark_records_each_balanced_budget(tmp_path):
    """The offload benchmark on the CPU (tiny model, one spec): both balanced budgets run, leave the share
    they are named for on the CPU, match the resident output, and reach the table."""
    script = REPO / "benchmarks" / "offload.py"
    cmd = [sys.executable, str(script), "--device", "cpu", "--model", "tiny", "--specs", "nncf:int8_sym"]
    cmd += ["--modes", "balanced half,balanced half on CPU"]
    subprocess.run([*cmd, "--out", str(tmp_path)], check=True, capture_output=True, timeout=600)
    rows = {r["mode"]: r for r in json.loads((tmp_path / "offload.json").read_text())["rows"]}
    half, half_on_cpu = rows["balanced half"], rows["balanced half on CPU"]
    assert half["budget"] == pytest.approx(rows["resident"]["stored"] / 2, abs=1)
    assert half_on_cpu["budget"] > half["budget"]
    assert half["on_cpu"] > half_on_cpu["on_cpu"]
    # about half (the tiny model has three blocks, so "about" is coarse)
    assert 0.1 < half_on_cpu["on_cpu"] <= 0.6
    assert half["err"] == half_on_cpu["err"] == 0.0
    table = (tmp_path / "offload.md").read_text()
    assert "| nncf:int8_sym | balanced half on CPU |" in table and (tmp_path / "offload.png").stat().st_size


def test_multi_gpu_benchmark_dry_run_and_its_refusal_without_two_gpus(tmp_path):
    """benchmarks/multi_gpu.py on the CPU (--dry-run, tiny model, one spec): every placement runs, the
    budgeted one keeps to its budget per GPU, each output matches the one-GPU output, and the table is
    written; without --dry-run on a machine with fewer than two GPUs it says so and exits 2."""
    script = REPO / "benchmarks" / "multi_gpu.py"
    cmd = [sys.executable, str(script), "--model", "tiny", "--specs", "nncf:int8", "--out", str(tmp_path)]
    subprocess.run([*cmd, "--dry-run"], check=True, capture_output=True, timeout=600)
    result = json.loads((tmp_path / "multi_gpu.json").read_text())
    rows = {r["placement"]: r for r in result["rows"]}
    assert result["dry_run"] and set(rows) == {"one GPU", "two GPUs, even", "two GPUs, 0.6 each"}
    assert all("error" not in r and r["err"] == 0.0 and r["step_ms"] > 0 for r in rows.values())
    tight = rows["two GPUs, 0.6 each"]
    assert {"cuda:0", "cuda:1"} <= set(tight["planned"]) and tight["max_memory"].startswith("0:")
    assert all(tight["planned"][d] <= tight["budget_per_gpu"] for d in ("cuda:0", "cuda:1"))
    assert sum(tight["planned"].values()) == tight["stored"]
    table = (tmp_path / "multi_gpu.md").read_text()
    assert "| nncf:int8 | two GPUs, 0.6 each |" in table and "dry run" in table
    import torch

    if torch.cuda.device_count() < 2:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2 and "needs two CUDA devices" in proc.stderr


def test_a_rows_fused_paths_and_profile_of_one_step(monkeypatch):
    """bench.py's per-row diagnostics on a one-layer model: which fused path the layer took in a step
    (the hand-written kernel, here under Triton's interpreter), a profiled step's host ops, the host's speed."""
    import torch

    from diffusers_quant import fused, kernels
    from diffusers_quant.backends.gguf.nn import GGUFLinear

    bench = _bench_module()
    monkeypatch.setattr(fused, "FUSED_DEVICES", {"cuda", "cpu"})
    monkeypatch.setattr(kernels, "KERNEL_DEVICES", {"cuda", "cpu"})
    monkeypatch.delenv(fused.REFERENCE_ENV, raising=False)
    monkeypatch.delenv(fused.FUSED_ENV, raising=False)

    class OneLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = GGUFLinear.from_linear(torch.nn.Linear(64, 32), "Q8_0")

        def forward(self, hidden_states, return_dict=True):
            return (self.proj(hidden_states),)

    model, inputs = OneLayer(), {"hidden_states": torch.randn(2, 64, dtype=torch.bfloat16)}
    defn = bench.ModelDef("one-layer", None, 0, 0, warmup=1, steps=3, about="")
    _, figures = bench.time_steps(model, inputs, defn, "cpu")
    assert figures["fused_paths_per_step"] == {"gguf Q8_0": [1, 0]}
    assert len(figures["host_op_us"]) == 2 and figures["process_cpu_over_wall_in_steps"] > 0
    monkeypatch.setenv(fused.REFERENCE_ENV, "1")
    _, figures = bench.time_steps(model, inputs, defn, "cpu")
    assert figures["fused_paths_per_step"] == {}  # the reference: no fused path
    profile = bench.profile_step(model, inputs, "cpu")
    assert any(name in ("aten::linear", "aten::addmm", "aten::mm") for name, *_ in profile["top_host_ops"])
    assert profile["host_self_us"] > 0 and profile["top_kernels"] == [] and profile["runtime_calls"] == {}
    assert 0 < bench.host_op_us(calls=50) < 1e4
