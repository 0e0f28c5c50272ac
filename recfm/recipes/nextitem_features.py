"""Item side features for the next-item recipes (``embedding.item_attributes``).

An item's embedding becomes its id row plus the mean of its attribute embeddings::

    table [num_items, d] = ids.weight + EmbeddingBag(mean)(attribute tokens of each item row)

The same table embeds the input tokens and, with ``retrieval.share_item_table``, scores the full corpus, so an
attribute shared by many items (a genre, a release year) moves all of them together -- what helps rare items.

Attributes per dataset (:func:`load_item_attributes`; the files sit next to the interactions):

============== ============================ ==========================================================
dataset        file                         tokens
============== ============================ ==========================================================
ml-1m          ``movies.dat``               ``genre:<name>`` per genre, ``year:<yyyy>`` (from the title)
ml-100k        ``items.tsv`` / ``u.item``   ``genre:<id>`` (the first genre), ``year:<bucket>``
amazon-beauty  ``item_attributes.json``     ``attr:<id>`` per attribute id (S3Rec's brand / category ids)
============== ============================ ==========================================================

Only the training log's own files are read; an item with no entry has no attributes (its id row alone). An
attribute id of an item outside ``1..num_items`` is a DataError naming the file and the item.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from recfm.errors import ConfigError, DataError
from recfm.foundation.data.real import beauty, ml1m, ml100k
from recfm.recipes.nextitem_config import DataSection, Dataset
from recfm.recipes.nextitem_data import resolve_source


@dataclass(frozen=True)
class ItemAttributes:
    """Attribute tokens of every item row (row = item id - 1).

    ``tokens [A]`` int64 ids into ``names`` (the vocabulary, sorted), jagged by ``offsets [num_items + 1]``
    over the item rows; ``source`` the file read.
    """

    tokens: torch.Tensor
    offsets: torch.Tensor
    names: tuple[str, ...]
    source: str

    @property
    def num_items(self) -> int:
        return self.offsets.numel() - 1

    def covered(self) -> int:
        """Items with at least one attribute."""
        return int((self.offsets[1:] > self.offsets[:-1]).sum())

    def to(self, device: torch.device | str) -> ItemAttributes:
        return ItemAttributes(self.tokens.to(device), self.offsets.to(device), self.names, self.source)

    def summary(self) -> dict:
        return {"source": self.source, "vocabulary": len(self.names), "items_with_attributes": self.covered(),
                "tokens": int(self.tokens.numel())}


def from_mapping(mapping: dict[int, list[str]], num_items: int, source: str = "<memory>") -> ItemAttributes:
    """:class:`ItemAttributes` from ``{item id: tokens}`` (ids ``1..num_items``; missing items: no attributes).
    Duplicate tokens of one item count once."""
    bad = sorted(i for i in mapping if not 1 <= i <= num_items)
    if bad:
        raise DataError(f"{source}: item {bad[0]} out of range 1..{num_items} (data.num_items)")
    names = tuple(sorted({t for tokens in mapping.values() for t in tokens}))
    index = {name: k for k, name in enumerate(names)}
    per_row = [sorted({index[t] for t in mapping.get(row + 1, ())}) for row in range(num_items)]
    lengths = np.array([len(r) for r in per_row], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.array([t for r in per_row for t in r], dtype=np.int64)
    return ItemAttributes(torch.from_numpy(flat), torch.from_numpy(offsets), names, source)


def load_item_attributes(section: DataSection, num_items: int) -> ItemAttributes:
    """The attributes of ``section``'s dataset (module docstring); ConfigError for a dataset without any."""
    src = resolve_source(section)
    folder = src if src.is_dir() else src.parent
    if section.dataset is Dataset.ML_1M:
        path = folder / ml1m.MOVIES_FILE
        if not path.is_file():
            raise DataError(f"{path}: file not found (embedding.item_attributes needs the movie side file)")
        return from_mapping(ml1m.read_movies(path), num_items, str(path))
    if section.dataset is Dataset.ML_100K:
        _ratings, _users, items, path, _layout = ml100k.read(folder)
        mapping = {i: [f"genre:{genre}", f"year:{year}"] for i, (genre, year) in items.items()}
        return from_mapping(mapping, num_items, f"{path.parent} (items)")
    if section.dataset is Dataset.AMAZON_BEAUTY:
        path = next((folder / n for n in beauty.ATTRIBUTE_FILES if (folder / n).is_file()), None)
        if path is None:
            raise DataError(f"{folder}: none of {', '.join(beauty.ATTRIBUTE_FILES)} found (embedding.item_attributes)")
        table = beauty.read_attributes(path).to_pydict()
        mapping = {i: [f"attr:{a}" for a in attrs] for i, attrs in zip(table["item_id"], table["attribute_ids"])}
        return from_mapping(mapping, num_items, str(path))
    raise ConfigError([f"embedding.item_attributes: dataset {section.dataset.value} has no item side file; "
                       "set embedding.item_attributes=false"])


class ItemTable(nn.Module):
    """``[num_items, d]`` item embeddings: an id table plus the mean of each item's attribute embeddings.

    Exposes ``weight`` (the whole table, recomputed from the parameters on each access), ``forward(ids)``,
    ``num_embeddings`` and ``embedding_dim`` like an ``nn.Embedding``, so the retrieval head can share it.
    """

    def __init__(self, num_items: int, d: int, attributes: ItemAttributes):
        super().__init__()
        if attributes.num_items != num_items:
            raise ConfigError([f"embedding.item_attributes: attributes cover {attributes.num_items} items, "
                               f"the item table has {num_items}"])
        self.ids = nn.Embedding(num_items, d)
        self.attributes = nn.EmbeddingBag(max(1, len(attributes.names)), d, mode="mean")
        nn.init.normal_(self.ids.weight, std=0.02)
        nn.init.normal_(self.attributes.weight, std=0.02)
        self.num_embeddings, self.embedding_dim = num_items, d  # as nn.Embedding's (RetrievalHead checks them)
        # built on the CPU like the parameters; module.to(device) moves them together
        self.register_buffer("tokens", attributes.tokens.cpu().clone(), persistent=False)
        self.register_buffer("starts", attributes.offsets[:-1].cpu().clone(), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.ids.weight + self.attributes(self.tokens, self.starts)  # empty bags add zeros

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)
