"""What this package adds to a Python process's start: ``import diffusers_quant`` and the autoload ``.pth``
hook, with ``DIFFUSERS_QUANT`` unset and set, against a bare interpreter, in the same run.

    python benchmarks/startup.py --out benchmarks/results/cpu-2c

Each row: median wall time of 21 fresh interpreters (after 3 warm-up starts), and the modules the row
imported beyond the bare interpreter's. The .pth rows read a temporary folder's .pth files with
``site.addsitedir``, as interpreter start-up reads site-packages'. Writes startup.json and startup.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffusers_quant import plugin  # noqa: E402

REPORT = "import sys, json; print(json.dumps(sorted(sys.modules)))"


def timed(code: str, env: dict, n: int = 21) -> tuple[float, list[str]]:
    cmd = [sys.executable, "-c", code + "\n" + REPORT]
    for _ in range(3):
        subprocess.run(cmd, env=env, capture_output=True, check=True)
    times, modules = [], []
    for _ in range(n):
        t = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        times.append((time.perf_counter() - t) * 1e3)
        modules = json.loads(out.stdout.splitlines()[-1])
    return statistics.median(times), modules


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    a = parser.parse_args()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFUSERS_QUANT")}
    with tempfile.TemporaryDirectory() as site:
        plugin.autoload_enable(Path(site))
        addsite = f"import site; site.addsitedir({site!r})"
        rows = [
            ("bare interpreter", "pass", base_env),
            ("import diffusers_quant", "import diffusers_quant", base_env),
            ("autoload .pth, DIFFUSERS_QUANT unset", addsite, base_env),
            ("autoload .pth, DIFFUSERS_QUANT set", addsite, {**base_env, "DIFFUSERS_QUANT": "model=bnb:nf4"}),
        ]
        results, bare_modules = [], None
        bare_ms = None
        for name, code, env in rows:
            ms, modules = timed(code if code != "pass" else "", env)
            if bare_modules is None:
                bare_modules, bare_ms = set(modules), ms
            extra = sorted(set(modules) - bare_modules)
            heavy = [
                m for m in extra if m.split(".")[0] in ("torch", "diffusers", "transformers", "bitsandbytes")
            ]
            results.append(
                dict(row=name, ms=ms, added_ms=ms - bare_ms, extra_modules=len(extra), heavy_modules=heavy)
            )
            print(json.dumps(results[-1]), flush=True)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "startup.json").write_text(
            json.dumps({"python": sys.version.split()[0], "rows": results}, indent=2)
        )
        lines = [
            "# Process start: what this package adds (median of 21 fresh interpreters, same run)",
            "",
            "| row | start ms | added ms | modules added | torch / diffusers / transformers imported |",
            "|---|---|---|---|---|",
        ]
        for r in results:
            lines.append(
                f"| {r['row']} | {r['ms']:.1f} | {r['added_ms']:+.1f} | {r['extra_modules']} | "
                f"{'none' if not r['heavy_modules'] else len(r['heavy_modules'])} |"
            )
        (out / "startup.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
