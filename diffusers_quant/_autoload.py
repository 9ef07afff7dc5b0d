"""Imported by the autoload ``.pth`` line, only when ``DIFFUSERS_QUANT`` is set: checks the plan now (a bad
one stops the process before the app runs) and installs the hooks when the process first imports diffusers,
so a process that never uses diffusers pays for nothing more than this module."""

from __future__ import annotations

import sys


def _start() -> None:
    from . import plugin
    from .errors import QuantError

    try:
        plan = plugin.resolve_plan(None, "env")
    except QuantError as e:
        print(f"diffusers-quant: error: bad {plugin.ENV_VAR}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if "diffusers" in sys.modules:  # imported already (by another .pth): install now
        _install(plan)
        return
    sys.meta_path.insert(0, _WhenImported("diffusers", lambda: _install(plan)))


def _install(plan) -> None:
    from . import install, plugin

    install(plan)
    plugin.ANNOUNCE = True


class _WhenImported:  # a meta path finder (importlib.abc would add 10 ms to every start)
    """Runs ``then`` right after the package ``name`` has been imported, once, then steps aside."""

    def __init__(self, name: str, then) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        # the finder that would have found it (site-packages, or an editable install's own finder)
        spec = next(
            (
                s
                for f in sys.meta_path
                if hasattr(f, "find_spec") and (s := f.find_spec(fullname, path, target))
            ),
            None,
        )
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        # the package's own loader, with one step after its code has run (its other methods untouched)
        loader, then = spec.loader, self.then
        run = loader.exec_module

        def exec_module(module):
            run(module)
            then()

        loader.exec_module = exec_module
        return spec


_start()
