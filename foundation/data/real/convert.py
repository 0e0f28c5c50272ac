"""Convert a public dataset's folder into recfm raw logs (``recfm data convert <dataset> --src --out``).

Output, in ``out/`` (formats of :mod:`recfm.foundation.data.schema`)::

    events.parquet          user_id:int64 timestamp:int64 action:string item_id:int64 [rating, ...]
    exposures.parquet       exposure_id:int64 user_id:int64 timestamp:int64 scenario:string
                            <features> <labels>            (datasets with labelled exposures only)
    <side tables>.parquet   e.g. items.parquet, test_purchases.parquet (see each converter)
    convert_report.json     ConvertReport: layout recognised, files, counts, notes

Each converter module's docstring states its choices (synthetic times, labels, splits). The source folder
may hold the shared copy's layout or the publisher's original one; the layout is recognised from the files
present (and their header), never from a flag.

Example::

    report = convert("ml-1m", src="path/to/ml-1m", out="runs/ml-1m")
    print(report.format())
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from recfm.errors import DataError, RecfmError
from recfm.foundation.data.real.beauty import convert_beauty
from recfm.foundation.data.real.douban import convert_douban
from recfm.foundation.data.real.ml1m import convert_ml1m
from recfm.foundation.data.real.ml100k import convert_ml100k
from recfm.foundation.data.real.report import ConvertReport
from recfm.foundation.data.real.retailrocket import convert_retailrocket

CONVERTERS: dict[str, Callable[[Path, Path], ConvertReport]] = {
    "ml-1m": convert_ml1m,
    "amazon-beauty": convert_beauty,
    "douban": convert_douban,
    "retailrocket": convert_retailrocket,
    "ml-100k": convert_ml100k,
}


def convert(dataset: str, src: str | Path, out: str | Path) -> ConvertReport:
    """Convert ``src`` (a dataset folder) into raw logs in ``out`` (created if needed).

    Raises:
        RecfmError: unknown dataset name (the message lists the known ones).
        DataError: missing source folder or file, malformed line (file and line named).
    """
    fn = CONVERTERS.get(dataset)
    if fn is None:
        raise RecfmError(f"unknown dataset {dataset!r} (known: {', '.join(CONVERTERS)})")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DataError(f"{src}: source folder not found")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = fn(src, out)
    report = dataclasses.replace(report, out=str(out), seconds=round(time.perf_counter() - start, 3))
    report.save(out)
    return report
