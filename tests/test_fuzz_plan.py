"""Seeded fuzz of the plan grammar (issue 14, finding 8b), in a child process (tests/fuzzing.py): random
strings from the grammar's pieces and byte-level mutations of valid plans go through ``Plan.parse``,
``Spec.parse`` and the ``diffusers-quant check`` path on the demo pipeline. The only allowed outcomes: our
QuantError (SpecError / PlanRefused), or a plan that prints back to itself and that ``check`` judges (exit
0 or 1, never a traceback)."""

from __future__ import annotations

from fuzzing import findings, run_cases

SETUP = r"""
import contextlib, io, random

from diffusers_quant.cli import main
from diffusers_quant.demo import demo_path
from diffusers_quant.spec import Plan, Spec

FOLDER = str(demo_path("sd"))
PIECES = [
    "unet", "text_encoder", "vae", "transformer", "*", "=", ":", ";", ",", "|", "?", "&", " ", "bnb", "nf4",
    "int8", "quanto", "qint4", "qfloat8", "nncf", "int4_sym", "gguf", "q8_0", "none", "offload", "balanced",
    "sequential", "model", "group", "mode", "on-load", "post-load", "device", "cuda", "cpu", "cuda:1",
    "dtype", "bf16", "compute", "fp8", "auto", "min_features", "blocksize", "group_size", "128", "0", "-1",
    "1e309", "nan", "include", "exclude", "*attn*", "\u00e9", "\x00", "[", "'", '"', "\\", "../x.gguf",
]
VALID = [
    "unet=bnb:nf4", "unet=quanto:qint8;offload=model", "text_encoder=nncf:int8,unet=quanto:qint4",
    "unet=bnb:nf4?blocksize=128&double_quant=false;mode=post-load", "unet=none;dtype=bf16",
    "unet=quanto:qint8?include=*attn*|*ff*;compute=int8",
]
PRINTABLE = [chr(c) for c in range(32, 127)]


def _strings(seed):
    rng = random.Random(seed)
    yield rng.choice(VALID)  # one valid plan as it is: check runs in every case
    for _ in range(40):
        if rng.random() < 0.5:
            yield "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 14)))
        else:
            text = list(rng.choice(VALID))
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(text))
                op = rng.random()
                if op < 0.4:
                    text[i] = rng.choice(PRINTABLE)
                elif op < 0.7:
                    del text[i]
                else:
                    text.insert(i, rng.choice(PIECES))
            yield "".join(text)


def case(seed):
    checked = 0
    for text in _strings(seed):
        try:
            plan = Plan.parse(text)
        except QuantError as error:
            assert str(error), text
            continue
        assert Plan.parse(str(plan)) == plan, f"{text!r} does not round-trip: {plan}"
        for _, spec in plan.entries:
            if spec is not None:
                assert Spec.parse(str(spec)) == spec, f"{spec} does not round-trip"
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = main(["check", "--model", FOLDER, "--quant", str(plan)])
        assert code in (0, 1, 2), f"check {text!r} exited {code}: {out.getvalue()[-500:]}"
        assert "Traceback" not in out.getvalue(), out.getvalue()
        checked += 1
    assert checked, "the generator must reach plans that parse"
    for text in _strings(seed + 1000):  # Spec.parse on its own, with what a spec may hold
        try:
            spec = Spec.parse(text.split("=", 1)[-1].split(";")[0])
        except QuantError as error:
            assert str(error), text
            continue
        assert Spec.parse(str(spec)) == spec, f"{text!r}: {spec} does not round-trip"
"""


def test_random_and_mutated_plans_are_parsed_or_refused_by_our_error():
    outcomes = run_cases(SETUP, [{"seed": seed} for seed in range(25)], case_timeout=60)
    bad = findings(outcomes, allowed=("ok",))  # a case catches our errors itself: any escape is a finding
    assert not bad, "\n".join(o.describe() for o in bad)
