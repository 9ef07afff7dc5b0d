"""The project's exceptions: each message names the valid choices and the fix."""

from __future__ import annotations


class QuantError(ValueError):
    """Base class: bad user input or an impossible combination, found before any weight is read."""


class SpecError(QuantError):
    """A quantization spec or plan string that does not parse or names unknown things."""


class BackendUnavailable(QuantError, ImportError):
    """The backend's library is not installed; the message names the pip extra."""


class PlanRefused(QuantError):
    """The plan cannot work for this load; carries every problem found, not just the first."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"diffusers_quant refused the plan before reading any weight:\n{lines}")


def choices(values) -> str:
    """Render valid choices the same way in every message."""
    return ", ".join(sorted(str(v) for v in values))
