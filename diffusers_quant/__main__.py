"""``python -m diffusers_quant [--quant PLAN] app.py [args...]`` (or ``-m module``): run an existing app with
the hooks installed. ``python -m diffusers_quant <command> ...`` runs the ``diffusers-quant`` command line."""

from __future__ import annotations

import sys

from .cli import main

_COMMANDS = {"generate", "check", "quantize", "inspect", "run", "autoload"}


def _main(argv: list[str]) -> int:
    if argv and (argv[0] in _COMMANDS or argv[0] in ("-h", "--help")):
        return main(argv)
    return main(["run", *argv])


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
