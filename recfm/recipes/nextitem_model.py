"""The next-item model (item table -> HSTU backbone or SASRec -> retrieval head) and its full-corpus evaluation.

::

    ids [N] (item rows) --item table [num_items, d]--> x [N, d]
        (with embedding.item_attributes: id row + mean of the item's attribute rows, nextitem_features)
        HSTU:   Dropout(x * sqrt(d) [+ pos[p] with embedding.positions])
                -> Backbone(mask_mode="causal", all layers full; positions: its relative bias; with
                   backbone.layer.use_time_bias the tokens' real Unix times (JaggedBatch.times) as
                   timestamps: a bias by log-bucketed |t_i - t_j|)
        SASRec: SASRec(x)             (learned absolute positions, softmax causal attention)
    -> h [N, d] -> RetrievalHead (shared item table, L2-normalised, temperature, sampled softmax)

Time bias: only with real timestamps. A dataset without them (``Split.times is None``) and
``use_time_bias: true`` is a ConfigError (:func:`check_timestamps`) -- token positions are never passed off as
times. Query ``i`` and key ``j`` use their own items' times (the query's is that of the last item it has
seen, not of the item it predicts).

Evaluation ranks each user's held-out item among ALL ``num_items`` items (rows of the table) from the output
at the user's last input token. With ``train.exclude_history`` (the published protocol: the HSTU
repository's research evaluation filters each user's input history from the top-k, ``filter_invalid_ids``;
S3Rec zeroes the training items' scores) the items of the user's input -- its most recent ``max_len`` items --
are removed from the candidates (the target never is); without it every item competes. Ties are pessimistic (:func:`recfm.heads.retrieval.full_ranks`): an
item whose score is within 1e-6 of the target's counts as ranked ahead of it, so a collapsed model gets the
worst rank. Metrics: HR@K = share of users with rank <= K; NDCG@K = mean of ``1 / log2(rank + 1)`` over
users with rank <= K (0 otherwise) -- one relevant item per user.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from recfm.errors import ConfigError, RecfmError
from recfm.foundation.model.backbone import Backbone
from recfm.foundation.model.sasrec import SASRec
from recfm.heads.retrieval import RetrievalHead, hr_ndcg_at_k
from recfm.recipes.nextitem_config import NextItemConfig
from recfm.recipes.nextitem_data import JaggedBatch, NextItemData, Split, gather_batch
from recfm.recipes.nextitem_features import ItemAttributes, ItemTable

KS = (10, 50)
METRICS = tuple(f"{m}@{k}" for k in KS for m in ("hr", "ndcg"))


class NextItemModel(nn.Module):
    """Item table + encoder + retrieval head for one next-item config (module docstring); ``attributes``
    (required when ``embedding.item_attributes`` is on) feed the item table's side features."""

    def __init__(self, cfg: NextItemConfig, num_items: int, attributes: ItemAttributes | None = None):
        super().__init__()
        self.kind, d = cfg.model, cfg.d_model
        if cfg.embedding.item_attributes:
            if attributes is None:
                raise ConfigError([f"{cfg.source_file}: embedding.item_attributes is on but no attributes were "
                                   "loaded (nextitem_features.load_item_attributes)"])
            self.items = ItemTable(num_items, d, attributes)
        else:
            self.items = nn.Embedding(num_items, d)
            nn.init.normal_(self.items.weight, std=0.02)
        if cfg.model == "hstu":
            self.encoder = Backbone(cfg.backbone)
            self.use_time = cfg.backbone.layer.use_time_bias
        else:
            self.encoder = SASRec(cfg.sasrec)
            self.use_time = False
        self.input_dropout = nn.Dropout(cfg.embedding.dropout)
        self.positions = None
        if cfg.model == "hstu" and cfg.embedding.positions:
            self.positions = nn.Embedding(cfg.embedding.positions, d)
            nn.init.trunc_normal_(self.positions.weight, std=d ** -0.5, a=-2 * d ** -0.5, b=2 * d ** -0.5)
        r = cfg.retrieval
        table = self.items if r.share_item_table else None
        self.head = RetrievalHead(d, num_items, d, item_table=table, temperature=r.temperature,
                                  num_negatives=r.num_negatives, negatives=r.negatives)

    def encode(self, batch: JaggedBatch, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, d]`` causal outputs of a jagged batch.

        Args:
            batch: from :func:`gather_batch`; with the HSTU time bias on, ``batch.times [N]`` int64 Unix seconds
                are the backbone's timestamps (a batch without them: RecfmError; see :func:`check_timestamps`).
            positions: ``[N]`` int64 rows of the absolute position table (``embedding.positions``); default the
                tokens' positions in their samples. Never used as timestamps.
        """
        timestamps = None
        if self.use_time:
            if batch.times is None:
                raise RecfmError("NextItemModel.encode: backbone.layer.use_time_bias is on but the batch has no "
                                 "timestamps (JaggedBatch.times is None); check_timestamps(cfg, data) says why")
            timestamps = batch.times
        x = self.items(batch.ids)
        if self.kind == "sasrec":
            return self.encoder(x, batch.offsets, batch.max_len)
        x = x * math.sqrt(x.shape[1])
        if self.positions is not None:
            x = x + self.positions(positions if positions is not None else token_positions(batch))
        x = self.input_dropout(x)
        group = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        # validate=False: the batch comes from gather_batch over a checked split (no host sync per step)
        return self.encoder(x, batch.offsets, None, timestamps, group, batch.max_len, mask_mode="causal",
                            validate=False)


def check_timestamps(cfg: NextItemConfig, data: NextItemData) -> None:
    """ConfigError naming the config file and ``backbone.layer.use_time_bias`` when the HSTU time bias is on
    and ``data`` has no real timestamps (module docstring)."""
    if cfg.model == "hstu" and cfg.backbone.layer.use_time_bias and not data.has_times:
        raise ConfigError([f"{cfg.source_file}: backbone.layer.use_time_bias: true needs real timestamps, but "
                           f"data.dataset={cfg.data.dataset.value} ({data.source}) has none; set "
                           "backbone.layer.use_time_bias=false (positions enter through the position bias)"])


def token_positions(batch: JaggedBatch) -> torch.Tensor:
    """``[N]`` int64 position of each token inside its sample (synthetic timestamps: one step apart)."""
    n = batch.ids.shape[0]
    lengths = batch.offsets[1:] - batch.offsets[:-1]
    start = torch.repeat_interleave(batch.offsets[:-1], lengths, output_size=n)
    return torch.arange(n, device=batch.ids.device) - start


def rank_metrics(ranks: torch.Tensor, ks=KS) -> dict[str, float]:
    """HR@K and NDCG@K from 1-based ranks ``[U]`` (module docstring): ``{"hr@10": .., "ndcg@10": .., ...}``."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"hr@{k}"], out[f"ndcg@{k}"] = hr_ndcg_at_k(ranks, k)
    return out


@torch.no_grad()
def evaluate(model: NextItemModel, split: Split, batch_users: int, chunk: int, autocast: bool,
             exclude_history: bool = False) -> tuple[dict, torch.Tensor]:
    """Rank every user's held-out item of ``split`` (valid or test) over the full corpus.

    Users are taken in order in batches of ``batch_users`` (each batch is a contiguous slice of the split's
    tokens); the encoder runs under bf16 autocast when ``autocast``; scores are fp32. With
    ``exclude_history`` the items of the user's input (its most recent ``max_len`` items) are removed from
    the candidates, except the target itself (``train.exclude_history``; module docstring).

    Returns:
        ``(metrics, ranks [U])``.
    """
    was_training = model.training
    model.eval()
    device = split.inputs.device
    ranks = []
    for start in range(0, split.num_users, batch_users):
        users = np.arange(start, min(start + batch_users, split.num_users))
        batch = gather_batch(split, users)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            h = model.encode(batch, token_positions(batch))
        last = h[batch.offsets[1:] - 1].float()  # [B, d] output at each user's last input token
        exclude = dict(exclude_ids=batch.ids, exclude_offsets=batch.offsets) if exclude_history else {}
        ranks.append(model.head.ranks(last, split.targets[batch.users], chunk_size=chunk, **exclude))
    model.train(was_training)
    all_ranks = torch.cat(ranks)
    return rank_metrics(all_ranks), all_ranks
