"""What a load did, per component: spec, mode, bytes before and after, time, device."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ComponentReport:
    name: str
    kind: str
    class_name: str
    spec: str | None
    mode: str  # on-load, post-load, pre-quantized, or "none" when left in full precision
    bytes_before: int
    bytes_after: int
    layers_quantized: int = 0
    linears_total: int = 0
    seconds: float = 0.0
    device: str = "cpu"

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0


@dataclass
class Report:
    components: list[ComponentReport] = field(default_factory=list)
    plan: str = ""
    offload: str = "none"

    def add(self, item: ComponentReport) -> None:
        self.components = [c for c in self.components if c.name != item.name] + [item]

    def __getitem__(self, name: str) -> ComponentReport:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(f"no component {name!r} in this report; it has {', '.join(self.names()) or 'none'}")

    def names(self) -> list[str]:
        return [c.name for c in self.components]

    def to_dict(self) -> dict:
        return {
            "plan": self.plan,
            "offload": self.offload,
            "components": [asdict(c) for c in self.components],
        }

    def __str__(self) -> str:
        header = ("component", "spec", "mode", "layers", "before", "after", "ratio", "time", "device")
        rows = [
            (
                c.name,
                c.spec or "-",
                c.mode,
                f"{c.layers_quantized}/{c.linears_total}",
                _mib(c.bytes_before),
                _mib(c.bytes_after),
                f"{c.ratio:.2f}x",
                f"{c.seconds:.2f}s",
                c.device,
            )
            for c in self.components
        ]
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)) for r in [header, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        extra = f"plan: {self.plan}" + (f"   offload: {self.offload}" if self.offload != "none" else "")
        return "\n".join([extra, *lines])


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
