"""An existing diffusers app, unchanged: the hooks installed from outside it.

Three ways in, all taking the plan from ``--quant`` or the ``DIFFUSERS_QUANT`` environment variable:

* ``diffusers-quant run [--quant PLAN] app.py [args...]`` and ``python -m diffusers_quant [--quant PLAN]
  app.py [args...]`` (or ``-m module``): the app runs as ``__main__`` with its own argv, like ``coverage run``;
* ``diffusers-quant autoload enable``: a ``.pth`` file in the environment's site-packages that, in every
  Python process of that environment where ``DIFFUSERS_QUANT`` is set, installs the hooks as soon as the
  process imports diffusers. Where it is not set, the line imports nothing at all.

A bad plan stops the app before it starts, with the parse error and the grammar. Every load made through
the hooks then prints one line to stderr (``DIFFUSERS_QUANT_VERBOSE=1``: the whole report).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import QuantError

ENV_VAR = "DIFFUSERS_QUANT"
VERBOSE_ENV = "DIFFUSERS_QUANT_VERBOSE"
DEFAULT_PLAN = "model=bnb:nf4"
PTH_NAME = "diffusers_quant_autoload.pth"
# site runs a .pth line that starts with "import"; os is already imported by then, so with the variable
# unset this line imports nothing
PTH_LINE = f'import os; os.environ.get("{ENV_VAR}") and __import__("diffusers_quant._autoload")\n'
GRAMMAR = (
    "pattern=backend:qtype[?option=value&...][,pattern=...][;setting=value...], e.g. transformer=bnb:nf4"
)

# set by the ways in above: loads then announce themselves on stderr
ANNOUNCE = False


def resolve_plan(text: str | None, source: str):
    """The plan given (``--quant``), else ``DIFFUSERS_QUANT``, else the default; a bad one is a QuantError
    carrying the grammar."""
    from .spec import Plan

    text = text or os.environ.get(ENV_VAR) or DEFAULT_PLAN
    try:
        return Plan.parse(text, source=source)
    except QuantError as e:
        raise QuantError(f"{e}\n  plan: {text!r}\n  grammar: {GRAMMAR}") from None


def run_app(
    plan_text: str | None, target: str, argv: list[str], *, module: bool = False, settings: dict | None = None
) -> int:
    """Run the script (or ``module``) at ``target`` as ``__main__`` with ``argv``, the hooks installed."""
    import runpy

    global ANNOUNCE
    plan = resolve_plan(plan_text, "cli").with_settings(**(settings or {}))
    if not module and not os.path.isfile(target):
        raise QuantError(f"{target!r} is not a file; fix: give the app's script (or -m module.name)")
    if module:
        import importlib.util

        sys.path.insert(0, os.getcwd())  # as python -m does
        try:
            found = importlib.util.find_spec(target) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            sys.path.pop(0)
            raise QuantError(
                f"-m {target}: no module of that name here; fix: run from its folder, or give a script"
            )
    from . import install

    install(plan)
    ANNOUNCE = True
    sys.argv = [target, *argv]
    if module:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
        runpy.run_path(target, run_name="__main__")
    return 0


def announce(row) -> None:
    """One line on stderr for a component the hooks loaded (when a plugin way in is active)."""
    if not ANNOUNCE:
        return
    spec = row.spec or "-"
    _print(
        f"diffusers-quant: {row.name}: {spec} ({row.mode}) {row.bytes_before / 2**30:.2f} GiB -> "
        f"{row.bytes_after / 2**30:.2f} GiB ({row.ratio:.2f}x) in {row.seconds:.1f}s"
    )


def _print(line: str) -> None:
    """A line on stderr on its own line, also while a library's progress bar is drawn there (a pipeline's
    "Loading pipeline components" bar is, when its components announce themselves)."""
    try:
        from tqdm import tqdm
    except ImportError:  # diffusers needs tqdm; a process without it has no bar to step around
        print(line, file=sys.stderr)
        return
    tqdm.write(line, file=sys.stderr)


def announce_report(report) -> None:
    if ANNOUNCE and os.environ.get(VERBOSE_ENV) == "1":
        print(report, file=sys.stderr)


# --- autoload: the .pth hook ------------------------------------------------------------------------------


def site_packages() -> Path:
    """This interpreter's site-packages (where pip installed this package)."""
    import sysconfig

    return Path(sysconfig.get_paths()["purelib"])


def autoload_status(site: Path | None = None) -> tuple[bool, Path]:
    path = (site or site_packages()) / PTH_NAME
    return path.is_file() and path.read_text() == PTH_LINE, path


def autoload_enable(site: Path | None = None) -> Path:
    path = (site or site_packages()) / PTH_NAME
    if path.exists() and path.read_text() != PTH_LINE:
        raise QuantError(f"{path} exists and is not this package's autoload line; fix: look at it, remove it")
    path.write_text(PTH_LINE)
    return path


def autoload_disable(site: Path | None = None) -> Path:
    path = (site or site_packages()) / PTH_NAME
    if path.exists():
        if path.read_text() != PTH_LINE:
            raise QuantError(f"{path} is not this package's autoload line; it was left alone")
        path.unlink()
    return path
