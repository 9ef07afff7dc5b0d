"""Run fuzz cases in child processes with an address-space limit and a timeout per case.

A fuzz test writes the body of a function ``case(**params)`` (plus any setup it needs) as source text and a
list of parameter dicts; :func:`run_cases` runs them in a child Python (the repository and ``tests/`` on its
path, hooks not installed, progress bars off) and returns one :class:`Outcome` per case:

- ``refused``: the project's own ``QuantError`` left the case (its message is kept, to check that it names the
  file);
- ``ok``: the case returned (the case itself checks that what loaded matches the reference: an
  ``AssertionError`` there is an ``other``);
- ``other``: any other exception (type and message kept);
- ``timeout``: the case ran past ``case_timeout`` seconds;
- ``crash``: the child died (a signal, or the memory limit hit outside Python's reach).

The child runs many cases (a Python start with torch and diffusers costs seconds here); after a crash the
remaining cases go to a new child. The memory limit (``RLIMIT_AS``) turns a runaway allocation into an
``other`` (torch's "can't allocate memory") instead of a swamped machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
MARK = "@@FUZZ@@ "
MEMORY_LIMIT = 4 * 2**30  # bytes of address space per child: a header that inflates an allocation meets it
CASE_TIMEOUT = 60  # seconds per case

_CHILD = r"""
import json, os, signal, sys, traceback

def _alarm(signum, frame):
    raise TimeoutError("case timed out")

signal.signal(signal.SIGALRM, _alarm)

from diffusers_quant.errors import QuantError

{setup}

_timeout = {timeout}
for _line in sys.stdin:
    _job = json.loads(_line)
    _result = {{"index": _job["index"]}}
    signal.alarm(_timeout)
    try:
        case(**_job["params"])
        _result["outcome"] = "ok"
    except QuantError as _error:
        _result.update(outcome="refused", type=type(_error).__name__, message=str(_error))
    except TimeoutError as _error:
        _result.update(outcome="timeout", type="TimeoutError", message=str(_error))
    except BaseException as _error:  # every other outcome is a finding
        _result.update(
            outcome="other",
            type=type(_error).__name__,
            message=str(_error)[:2000],
            where=traceback.format_exc()[-3000:],
        )
    finally:
        signal.alarm(0)
    print({mark!r} + json.dumps(_result), flush=True)
"""


@dataclass(frozen=True)
class Outcome:
    params: dict
    outcome: str  # refused | ok | other | timeout | crash
    type: str = ""
    message: str = ""
    where: str = ""

    def describe(self) -> str:
        return f"{self.params}: {self.outcome} {self.type}: {self.message[:300]}\n{self.where}"


def _limit_memory(limit: int):
    def apply():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def run_cases(
    setup: str,
    cases: list[dict],
    *,
    memory_limit: int = MEMORY_LIMIT,
    case_timeout: int = CASE_TIMEOUT,
) -> list[Outcome]:
    """Each parameter dict of ``cases`` run as ``case(**params)`` in a child; one Outcome each, in order."""
    program = _CHILD.format(setup=textwrap.dedent(setup), timeout=int(case_timeout), mark=MARK)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    env.setdefault("DIFFUSERS_QUANT_PROGRESS", "0")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.pop("DIFFUSERS_QUANT", None)
    results: dict[int, Outcome] = {}
    pending = list(range(len(cases)))
    while pending:
        jobs = "".join(json.dumps({"index": i, "params": cases[i]}) + "\n" for i in pending)
        child = subprocess.run(
            [sys.executable, "-c", program],
            input=jobs,
            capture_output=True,
            text=True,
            env=env,
            preexec_fn=_limit_memory(memory_limit),
            timeout=case_timeout * len(pending) + 120,
        )
        for line in child.stdout.splitlines():
            if line.startswith(MARK):
                found = json.loads(line[len(MARK) :])
                index = found.pop("index")
                results[index] = Outcome(params=cases[index], **found)
        left = [i for i in pending if i not in results]
        if left and child.returncode == 0:
            raise RuntimeError(
                f"the fuzz child exited cleanly without answering cases {left}:\n{child.stderr[-3000:]}"
            )
        if left:  # the child died on the first unanswered case; the rest go to a new child
            dead = left[0]
            results[dead] = Outcome(
                params=cases[dead],
                outcome="crash",
                type=f"exit {child.returncode}",
                message=child.stderr[-2000:],
            )
            left = left[1:]
        pending = left
    return [results[i] for i in range(len(cases))]


def findings(outcomes: list[Outcome], *, allowed: tuple[str, ...] = ("refused", "ok")) -> list[Outcome]:
    """The outcomes outside ``allowed``: what a fuzz test reports when it fails."""
    return [o for o in outcomes if o.outcome not in allowed]
