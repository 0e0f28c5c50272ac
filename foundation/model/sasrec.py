"""SASRec (Kang & McAuley 2018): the softmax-attention baseline for next-item retrieval, on jagged tokens.

::

    x         = Dropout(item_emb * sqrt(d) + pos_emb[p])      p: 0 = the oldest token kept     [N, d]
    block b, layout "pre_ln" (default):
              x = x + Dropout(MHA_causal(LN(x)))               torch scaled_dot_product_attention
              x = x + Dropout(W2 Dropout(act(W1 LN(x))))       point-wise feed-forward
    block b, layout "kang" (Kang & McAuley's layout, also the HSTU repository's SASRec):
              q = LN(x);  x = LN(q + MHA_causal(query=q, keys=values=x))   residual on the normalised query
              x = x + Dropout(W2 Dropout(act(W1 x)))
    out       = LN(x) if final_norm else x                                                     [N, d]

``activation`` is ``gelu`` or ``relu`` (the original's). ``init: xavier`` draws every weight matrix of the
blocks xavier-normal and the positions from a normal of std ``1/sqrt(d)`` truncated at 2 std (the HSTU
repository's SASRec); ``init: torch`` keeps torch's Linear defaults and positions of std 0.02.

The encoder takes the same jagged layout as :class:`recfm.foundation.model.backbone.Backbone`
(``x [N, d_model]``, offsets ``[B+1]`` int64, ``max_len`` host int) and returns ``[N, d_model]``, so the
next-item recipe swaps one for the other. Inside, the tokens are scattered into a right-padded
``[B, max_len, d]`` block (sample ``b`` in row ``b``, token ``i`` of the sample in column ``i``), attention runs
with ``is_causal=True`` and the valid positions are gathered back. Right padding needs no key mask: with a
causal mask a real token only sees columns ``<= i``, which are all real, so the flash/efficient SDPA
backends apply. Padded rows are computed and dropped. No per-sample Python loop, no host sync.

The caller supplies the item embeddings (``x``): the item table is shared with the retrieval head, as in
the HSTU recipe. The encoder owns the learned absolute positions (``max_len`` rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from recfm.errors import ConfigError, RecfmError
from recfm.foundation.model.bias import sample_ids


LAYOUTS = ("pre_ln", "kang")
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}
INITS = ("torch", "xavier")


@dataclass(frozen=True)
class SASRecConfig:
    """Shape of the SASRec encoder; ``ffn_dim = 0`` means ``d_model`` (the original SASRec)."""

    d_model: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    ffn_dim: int = 0
    dropout: float = 0.2  # embeddings, attention weights, residual branches, feed-forward
    max_len: int = 200  # rows of the absolute position table
    norm_eps: float = 1e-8
    layout: str = "pre_ln"  # pre_ln | kang (module docstring)
    activation: str = "gelu"  # gelu | relu
    final_norm: bool = True  # LayerNorm on the output (off: the head's L2 normalisation only)
    init: str = "torch"  # torch | xavier (module docstring)

    def __post_init__(self):
        problems = []
        for name in ("d_model", "num_blocks", "num_heads", "max_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                problems.append(f"sasrec.{name}: must be an int >= 1, got {v!r}")
        if not isinstance(self.ffn_dim, int) or self.ffn_dim < 0:
            problems.append(f"sasrec.ffn_dim: must be an int >= 0, got {self.ffn_dim!r}")
        if isinstance(self.d_model, int) and isinstance(self.num_heads, int) and self.num_heads >= 1 \
                and self.d_model % self.num_heads:
            problems.append(f"sasrec.num_heads: must divide d_model={self.d_model}, got {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"sasrec.dropout: must be in [0, 1), got {self.dropout}")
        for name, allowed in (("layout", LAYOUTS), ("activation", tuple(ACTIVATIONS)), ("init", INITS)):
            if getattr(self, name) not in allowed:
                problems.append(f"sasrec.{name}: must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if problems:
            raise ConfigError(problems)


class SASRecBlock(nn.Module):
    """Causal self-attention + feed-forward on a padded block ``[B, L, d]`` (layout: module docstring)."""

    def __init__(self, c: SASRecConfig):
        super().__init__()
        self.num_heads, self.p, self.kang = c.num_heads, c.dropout, c.layout == "kang"
        self.norm_attn = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.out = nn.Linear(c.d_model, c.d_model)
        self.norm_ffn = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        hidden = c.ffn_dim or c.d_model
        self.ffn = nn.Sequential(
            nn.Linear(c.d_model, hidden), ACTIVATIONS[c.activation](), nn.Dropout(c.dropout), nn.Linear(hidden, c.d_model)
        )
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        shape = (b, length, self.num_heads, d // self.num_heads)
        normed = self.norm_attn(x)
        if self.kang:  # query from LN(x), keys and values from x itself
            w, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(normed, w[:d], bias[:d]).view(shape)
            k, v = F.linear(x, w[d:], bias[d:]).view(b, length, 2, *shape[2:]).unbind(2)
        else:
            q, k, v = self.qkv(normed).view(b, length, 3, *shape[2:]).unbind(2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            dropout_p=self.p if self.training else 0.0, is_causal=True,
        )  # [B, h, L, d/h]
        attn = self.out(attn.transpose(1, 2).reshape(b, length, d))
        if self.kang:
            x = self.norm_ffn(normed + attn)
            return x + self.dropout(self.ffn(x))
        x = x + self.dropout(attn)
        return x + self.dropout(self.ffn(self.norm_ffn(x)))


class SASRec(nn.Module):
    """The SASRec encoder on jagged tokens (module docstring).

    Example::

        enc = SASRec(SASRecConfig(d_model=50, num_blocks=2, max_len=200))
        h = enc(item_table(ids), offsets, max_len=int(lengths.max()))   # [N, 50]
    """

    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.config = config
        self.positions = nn.Embedding(config.max_len, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(SASRecBlock(config) for _ in range(config.num_blocks))
        self.norm_out = nn.LayerNorm(config.d_model, eps=config.norm_eps) if config.final_norm else nn.Identity()
        if config.init == "xavier":
            std = config.d_model ** -0.5
            nn.init.trunc_normal_(self.positions.weight, std=std, a=-2 * std, b=2 * std)
            for block in self.blocks:
                for m in block.modules():
                    if isinstance(m, nn.Linear):
                        nn.init.xavier_normal_(m.weight)
                        nn.init.zeros_(m.bias)
        else:
            nn.init.normal_(self.positions.weight, std=0.02)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
        """Encode jagged item embeddings.

        Args:
            x: ``[N, d_model]`` item embeddings of B samples, concatenated (oldest first within a sample).
            offsets: ``[B+1]`` int64 sample offsets.
            max_len: host int ``>=`` the longest sample, ``<= config.max_len``.

        Returns:
            ``[N, d_model]``: the output at each token (causal: token i sees tokens 0..i of its sample).
        """
        c = self.config
        if x.dim() != 2 or x.shape[1] != c.d_model:
            raise RecfmError(f"SASRec: x must be [N, d_model={c.d_model}], got {tuple(x.shape)}")
        if max_len > c.max_len:
            raise RecfmError(f"SASRec: max_len={max_len} exceeds the position table (sasrec.max_len={c.max_len})")
        n = x.shape[0]
        sample = sample_ids(offsets, n)  # [N]
        pos = torch.arange(n, device=x.device) - offsets[sample]  # [N] position inside the sample
        h = self.dropout(x * math.sqrt(c.d_model) + self.positions(pos))
        padded = h.new_zeros(offsets.numel() - 1, max(max_len, 1), c.d_model)
        padded = padded.index_put((sample, pos), h)  # [B, L, d], right-padded
        for block in self.blocks:
            padded = block(padded)
        return self.norm_out(padded[sample, pos])
