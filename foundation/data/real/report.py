"""What a conversion did: the source format it recognised, the files it wrote, counts and notes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPORT_FILE = "convert_report.json"


@dataclass(frozen=True)
class ConvertReport:
    """Result of :func:`recfm.foundation.data.real.convert.convert`, also saved as ``convert_report.json``.

    Attributes:
        dataset: the dataset name it was converted as (``ml-1m``, ``douban``, ...).
        source_format: which layout of the source folder was recognised (e.g. ``grouplens ratings.dat``).
        files: names of the files written into ``out`` (raw logs and side tables).
        counts: named counts of what was read and written (users, items, events per action, skips, ...).
        notes: the choices a reader of the output must know (synthetic times, label definitions, ...).
        out: the output folder.
        seconds: wall time of the conversion.
    """

    dataset: str
    source_format: str
    files: tuple[str, ...]
    counts: dict[str, int | float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    out: str = ""
    seconds: float = 0.0

    def format(self) -> str:
        width = max((len(k) for k in self.counts), default=0)
        rows = [f"converted {self.dataset} ({self.source_format}) -> {self.out} in {self.seconds:.2f} s"]
        rows.append("files: " + ", ".join(self.files))
        rows += [f"  {k.ljust(width)}  {_num(v)}" for k, v in self.counts.items()]
        rows += [f"note: {n}" for n in self.notes]
        return "\n".join(rows)

    def to_json(self) -> dict:
        return asdict(self)

    def save(self, folder: Path) -> Path:
        path = folder / REPORT_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


def _num(v: int | float) -> str:
    return f"{v:,}" if isinstance(v, int) else f"{v:.4f}"
