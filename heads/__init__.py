"""Heads over the backbone's final T tokens: per-scenario multi-task heads and the next-item head.

``HEADS`` maps each :class:`~recfm.foundation.model.config.HeadKind` to its multi-task head class (a literal
table, no registration side effects); ``next_item`` tasks always use :class:`~recfm.heads.retrieval.RetrievalHead`.
"""

from __future__ import annotations

from recfm.foundation.model.config import HeadKind
from recfm.heads.mmoe import MMoEHead
from recfm.heads.retrieval import RetrievalHead

HEADS = {HeadKind.MMOE: MMoEHead}

__all__ = ["HEADS", "HeadKind", "MMoEHead", "RetrievalHead"]
