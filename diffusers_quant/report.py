"""What a load did, per component: spec, mode, bytes before and after, time, device."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ComponentReport:
    name: str
    kind: str
    class_name: str
    spec: str | None
    mode: str  # on-load, post-load, pre-quantized, native (the app's quantization_config), or "none"
    bytes_before: int
    bytes_after: int
    layers_quantized: int = 0
    linears_total: int = 0
    seconds: float = 0.0
    device: str = "cpu"
    compute: str = "none"  # fp8 / int8: how many Linears run W8A8 matmuls, e.g. "fp8 x120"

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
                (c.spec or "-") + (f" compute={c.compute}" if c.compute != "none" else ""),
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
        extra = f"plan: {self.plan or self._no_plan()}"
        extra += f"   offload: {self.offload}" if self.offload != "none" else ""
        return "\n".join([extra, *lines])

    def _no_plan(self) -> str:
        # A load with no plan only has what its checkpoints already held.
        return (
            "(none: pre-quantized)" if any(c.mode == "pre-quantized" for c in self.components) else "(none)"
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def to_pil(image):
    """A float HxWx3 array in [0, 1] as a PIL image, rounded as diffusers' ``numpy_to_pil`` does."""
    from PIL import Image

    return Image.fromarray((image * 255).round().clip(0, 255).astype("uint8"))


def comparison_sheet(full, quantized, lines: list[str], gain: float | None = None):
    """A PIL image: full precision | quantized | difference (amplified ``gain`` times), ``lines`` below.

    ``full`` and ``quantized`` are float HxWx3 arrays in [0, 1] from the same seed and prompt.  By default
    the difference is amplified so its largest value is white: a good quantization differs by little."""
    import textwrap

    import numpy as np
    from PIL import Image, ImageDraw

    difference = np.abs(quantized - full)
    if gain is None:
        gain = float(min(1000.0, 1.0 / max(float(difference.max()), 1e-3)))
    difference = np.clip(difference * gain, 0.0, 1.0)
    labels = ("full precision", "quantized", f"|difference| x{gain:.3g}")
    h, w = full.shape[:2]
    scale = max(1, -(-192 // w))  # tiny demo images are enlarged (nearest), so the labels fit under them
    pw, ph, pad, line = w * scale, h * scale, 8, 14
    width = 3 * pw + 4 * pad
    wrapped = [part for text in lines for part in textwrap.wrap(text, max(20, width // 6 - 2))]
    sheet = Image.new("RGB", (width, ph + 2 * pad + line * (1 + len(wrapped)) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (panel, label) in enumerate(zip((full, quantized, difference), labels, strict=True)):
        pixels = to_pil(panel)
        x = pad + i * (pw + pad)
        sheet.paste(pixels.resize((pw, ph), Image.NEAREST), (x, pad))
        draw.text((x, ph + pad + 2), label, fill="black")
    for j, text in enumerate(wrapped):
        draw.text((pad, ph + 2 * pad + line * (j + 1)), text, fill="black")
    return sheet
