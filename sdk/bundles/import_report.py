"""What ``edgeadapt import`` measured and wrote: :class:`ImportReport` and its readable table.

Filled in by :mod:`edgeadapt.bundles.importing` and :mod:`edgeadapt.bundles.import_verification`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class FormatCheck:
    """How one backbone format of the bundle agrees with the original model on the probes."""

    format: str
    file: str
    size: int
    quantization: str
    top1_agreement: float
    strict_top1_agreement: float
    original_ties: int
    probes: int
    parity_with_primary: dict[str, Any] | None = None
    embedding_cosine: float | None = None


@dataclass
class ImportReport:
    """What :func:`import_classifier` did and measured."""

    path: Path
    source: str
    source_format: str
    source_size: int
    head_operator: str
    tail: list[str]
    output_kind: str
    num_classes: int
    embedding_size: int
    input_spec: dict[str, Any]
    normalization_source: str
    head_size: int
    statistics_examples: int
    statistics_classes: int
    renamed_labels: dict[int, str]
    import_seconds: float
    formats: list[FormatCheck] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    background: str | None = None
    background_count: int = 0
    background_bytes: int = 0
    update_method: str = ""
    headless: bool = False

    def _statistics_line(self) -> str:
        if self.headless:
            carried = "empty (no classes yet; the device accumulates them for the classes it learns)"
        elif self.statistics_examples:
            carried = f"{self.statistics_examples} images of {self.statistics_classes} classes"
        else:
            carried = "none"
        return f"statistics    {carried}; updaters use {self.update_method} unless told otherwise (--method)"

    def table(self) -> str:
        spec = self.input_spec
        lines = [
            f"bundle        {self.path}",
            f"source        {self.source} ({self.source_format}, {self.source_size / 1024:.0f} KiB)",
            f"head          {self.head_operator} + {' -> '.join(self.tail) or 'no tail'} ({self.output_kind})",
            f"input         {spec['height']}x{spec['width']}x{spec['channels']} {spec['color_order']}, "
            f"float = pixel*{spec['scale']:.6g} + {spec['offset']:.6g} ({self.normalization_source})",
            f"classes       {self.num_classes}, embedding {self.embedding_size}, head {self.head_size / 1024:.0f} KiB "
            f"float32",
            self._statistics_line(),
            "background    " + (self.background or "none (give --background DIR: any folder of ordinary photos)"),
            f"import time   {self.import_seconds:.1f} s",
        ]
        if self.renamed_labels:
            lines.append(f"renamed       duplicate labels: {self.renamed_labels}")
        for check in self.formats:
            if self.headless:
                lines.append(
                    f"{check.format:<7} {check.file:<24} {check.size / 1024:>7.0f} KiB {check.quantization:<8} "
                    f"embedding cosine with the original output {check.embedding_cosine:.6f} on {check.probes} probes"
                    + (f"; vs {check.parity_with_primary['reference']}: cosine "
                       f"{check.parity_with_primary['embedding_cosine']:.6f}" if check.parity_with_primary else ""))
                continue
            parity = ""
            if check.parity_with_primary:
                parity = (f"; vs {check.parity_with_primary['reference']}: top-1 "
                          f"{check.parity_with_primary['top1_agreement']:.3f}, cosine "
                          f"{check.parity_with_primary['embedding_cosine']:.6f}")
            lines.append(
                f"{check.format:<7} {check.file:<24} {check.size / 1024:>7.0f} KiB {check.quantization:<8} "
                f"top-1 agreement with original {check.top1_agreement:.3f} on {check.probes} probes "
                f"(strict {check.strict_top1_agreement:.3f}, {check.original_ties} ties in the original){parity}"
            )
        lines += [f"warning       {text}" for text in self.warnings]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["renamed_labels"] = {str(key): value for key, value in self.renamed_labels.items()}
        return data
