"""One HSTU layer (Zhai et al. 2024) with grouped-query attention and Group LayerNorm (MTGR), on jagged tokens.

::

    x_hat      = GLN_in(x)                                   per-token-group LayerNorm   [N, d_model]
    U, Q       = SiLU(W_uq x_hat + b_uq)                     query rows only             [N_q, h*d_v], [N_q, h*d_qk]
    V, K       = SiLU(W_vk x_hat + b_vk)                     every token                 [N, h_kv*d_v], [N, h_kv*d_qk]
    O          = hstu_attention(Q, K, V, mask, rel. bias)    (kernels/hstu_attention)    [N_q, h*d_v]
    y          = x + W_out(Dropout(GLN_attn(O) * U))         query rows updated, others pass through

``[W_uq; W_vk]`` is the paper's single ``W1``, split in two so that a *target layer* (``query_index`` =
the T rows) computes U and Q only for its queries while K and V cover every token: cost ``O(L_T * L)``.
A full layer is the same code with every row a query, and runs the two as one matmul
(:mod:`recfm.kernels.linear_silu`, whose backward fuses SiLU's derivative, the parts' gradients and the bias
gradient into one pass).

Choices (brief section 4 says public implementations differ; these are ours, each switchable in
:class:`HSTUConfig` where an ablation needs it):

* **SiLU on U, V, Q and K** (the HSTU paper's ``phi_1``). ``silu_on`` picks the subset; e.g. ``("u",)``
  keeps Q/K/V linear as some public code does.
* **Scale** ``alpha = 1 / sqrt(d_qk)`` (brief), overridable by ``attn_alpha``.
* **Normaliser** ``length``: the sample's own token count, not the batch's padded maximum (brief; MTFM).
  ``keys`` (number of visible keys) is the leak-tight alternative; ``max_len`` and ``none`` are there for
  comparison with public code. See :class:`~recfm.kernels.hstu_attention.Normaliser`.
* **Relative bias** per layer and per head (``bias_per_head``): relative event position and log-bucketed
  time gap (:mod:`recfm.foundation.model.bias`); a target's position counts only the events it may
  see, so neither later events nor other targets move it.
* **Group LayerNorm** before the projections and on the attention output (MTGR): one affine pair per token
  group (H kind, R, T of each scenario), so tokens of different origin keep their own scale.
  ``GLN_attn(O) * U`` is one fused call (``group_layer_norm(..., gate=U)``): with the Triton kernels the
  normalised ``O`` is never written to memory nor kept for the backward.
* **Dropout** on ``GLN(O) * U`` only (as in the paper's eq. 3); set 0 for deterministic tests.
* **Mixed precision**: under autocast ``GLN_in`` writes ``x_hat`` in the autocast dtype, which the
  projections read as it is (a float32 ``x_hat`` would be cast once per projection, and its gradients cast
  back); statistics and affine stay in float32, and the residual stream keeps ``x``'s dtype.

Kernel implementations (``HSTUConfig.impl``), chosen per call from the tensors at hand -- no global switch:

* ``auto`` (default): for each op (attention, Group LayerNorm, projection), ``triton`` when the tensors are on a CUDA
  device, are float16/bfloat16/float32, Triton is importable and the op's ``IMPLS`` has a ``triton`` entry;
  ``reference`` otherwise (CPU, float64 gradchecks, no Triton). :func:`resolve_impl` is the rule.
* an explicit name of ``recfm.kernels.hstu_attention.IMPLS`` (``reference``, ``triton``, ...): attention
  uses exactly that; Group LayerNorm uses the same name when its ``IMPLS`` has it and ``auto`` otherwise
  (e.g. an attention-only implementation such as a dense one).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from recfm.errors import ConfigError, RecfmError
from recfm.foundation.model.bias import RelativeBias
from recfm.foundation.model.mask import MaskMode
from recfm.kernels.group_layer_norm import IMPLS as GLN_IMPLS
from recfm.kernels.group_layer_norm import group_layer_norm
from recfm.kernels.hstu_attention import IMPLS as ATTENTION_IMPLS
from recfm.kernels.hstu_attention import Normaliser, hstu_attention
from recfm.kernels.linear_silu import IMPLS as PROJ_IMPLS
from recfm.kernels.linear_silu import autocast_dtype, linear_silu

PROJECTIONS = ("u", "v", "q", "k")
AUTO = "auto"
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` would succeed (looked up once; Triton itself is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def resolve_impl(impl: str, x: torch.Tensor, impls: Mapping[str, object]) -> str:
    """The key of ``impls`` to run for ``impl`` (``auto`` or a name) on tensors like ``x`` (module docstring)."""
    if impl != AUTO and impl in impls:
        return impl
    if x.is_cuda and x.dtype in _TRITON_DTYPES and "triton" in impls and triton_available():
        return "triton"
    return "reference"


@dataclass(frozen=True)
class HSTUConfig:
    """Shape and options of one HSTU layer (every layer of a backbone shares it)."""

    d_model: int
    num_heads: int = 1
    num_kv_heads: int = 1  # GQA: num_heads % num_kv_heads == 0
    d_qk: int = 64
    d_v: int = 64
    dropout: float = 0.0
    attn_alpha: float | None = None  # None = 1 / sqrt(d_qk)
    normaliser: Normaliser = Normaliser.LENGTH
    silu_on: tuple[str, ...] = PROJECTIONS
    use_pos_bias: bool = True
    max_rel_pos: int = 256  # position bias table: 2 * max_rel_pos + 1 buckets
    use_time_bias: bool = True
    num_time_buckets: int = 32
    time_bucket_base: float = 2.0
    bias_per_head: bool = True
    num_groups: int = 1  # Group LayerNorm groups (see recfm.foundation.data.batch)
    norm_eps: float = 1e-5
    impl: str = AUTO  # kernel implementations: "auto" or a key of hstu_attention.IMPLS (module docstring)

    def __post_init__(self):
        problems = []
        try:
            object.__setattr__(self, "normaliser", Normaliser(self.normaliser))
        except ValueError:
            problems.append(f"hstu.normaliser: must be one of {[n.value for n in Normaliser]}, got {self.normaliser!r}")
        object.__setattr__(self, "silu_on", tuple(self.silu_on))
        for name in ("d_model", "num_heads", "num_kv_heads", "d_qk", "d_v", "num_groups", "num_time_buckets"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"hstu.{name}: must be an int >= 1, got {getattr(self, name)!r}")
        heads_ok = all(isinstance(n, int) and n >= 1 for n in (self.num_heads, self.num_kv_heads))
        if heads_ok and self.num_heads % self.num_kv_heads:
            problems.append(f"hstu.num_kv_heads: must divide num_heads={self.num_heads}, got {self.num_kv_heads}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"hstu.dropout: must be in [0, 1), got {self.dropout}")
        if not isinstance(self.max_rel_pos, int) or self.max_rel_pos < 0:
            problems.append(f"hstu.max_rel_pos: must be an int >= 0, got {self.max_rel_pos!r}")
        if not self.time_bucket_base > 1:
            problems.append(f"hstu.time_bucket_base: must be > 1, got {self.time_bucket_base}")
        if unknown := [p for p in self.silu_on if p not in PROJECTIONS]:
            problems.append(f"hstu.silu_on: unknown projections {unknown}, choose from {list(PROJECTIONS)}")
        if self.impl != AUTO and self.impl not in ATTENTION_IMPLS:
            problems.append(f"hstu.impl: must be one of {[AUTO, *sorted(ATTENTION_IMPLS)]}, got {self.impl!r}")
        if problems:
            raise ConfigError(problems)


class GroupLayerNorm(nn.Module):
    """LayerNorm with one ``(weight, bias)`` row per token group: ``[N, dim]``, group ``[N]`` -> ``[N, dim]``."""

    def __init__(self, num_groups: int, dim: int, eps: float = 1e-5, impl: str = AUTO):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_groups, dim))
        self.bias = nn.Parameter(torch.zeros(num_groups, dim))
        self.eps, self.impl = eps, impl

    def forward(self, x: torch.Tensor, group: torch.Tensor, validate: bool = True,
                gate: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, pass_through: bool = False,
                add: torch.Tensor | None = None):
        """``GLN(x)``, or ``GLN(x) * gate`` (``gate [N, dim]``) fused in one kernel pass; in ``out_dtype``
        (default ``x``'s). ``pass_through``: ``(GLN(x), x)``, ``x`` for a residual path whose gradient the
        backward kernel adds to its own. ``add``: normalise ``x + add``, summed in the same pass (and passed
        through in ``x``'s place) (:func:`recfm.kernels.group_layer_norm.group_layer_norm`)."""
        impl = resolve_impl(self.impl, x, GLN_IMPLS)
        return group_layer_norm(x, group, self.weight, self.bias, self.eps, impl=impl, validate=validate, gate=gate,
                                out_dtype=out_dtype, pass_through=pass_through, add=add)


class HSTULayer(nn.Module):
    """One HSTU layer; a *full* layer without ``query_index``, a *target* layer with it (module docstring)."""

    def __init__(self, config: HSTUConfig):
        super().__init__()
        c = self.config = config
        self.norm_in = GroupLayerNorm(c.num_groups, c.d_model, c.norm_eps, c.impl)
        self.proj_uq = nn.Linear(c.d_model, c.num_heads * (c.d_v + c.d_qk))
        self.proj_vk = nn.Linear(c.d_model, c.num_kv_heads * (c.d_v + c.d_qk))
        self.bias = RelativeBias(
            c.num_heads, use_pos=c.use_pos_bias, max_rel_pos=c.max_rel_pos, use_time=c.use_time_bias,
            num_time_buckets=c.num_time_buckets, time_bucket_base=c.time_bucket_base, per_head=c.bias_per_head,
        )
        self.norm_attn = GroupLayerNorm(c.num_groups, c.num_heads * c.d_v, c.norm_eps, c.impl)
        self.dropout = nn.Dropout(c.dropout)
        self.proj_out = nn.Linear(c.num_heads * c.d_v, c.d_model)

    def _project(self, x: torch.Tensor, projs: tuple[nn.Linear, ...], names: tuple[str, ...]):
        """``SiLU(x [W_a; W_b]^T + b)`` split into the parts ``names`` (SiLU on those in ``silu_on``): one
        matmul for the stacked weights of ``projs`` (:func:`recfm.kernels.linear_silu.linear_silu`)."""
        c = self.config
        width = {"u": c.num_heads * c.d_v, "q": c.num_heads * c.d_qk,
                 "v": c.num_kv_heads * c.d_v, "k": c.num_kv_heads * c.d_qk}
        return linear_silu(x, [p.weight for p in projs], [p.bias for p in projs], [width[n] for n in names],
                           [n in c.silu_on for n in names], impl=resolve_impl(c.impl, x, PROJ_IMPLS))

    def forward(
        self,
        x: torch.Tensor,
        offsets: torch.Tensor,
        *,
        token_type: torch.Tensor | None,
        timestamps: torch.Tensor | None,
        group: torch.Tensor,
        max_len: int,
        mask_mode: MaskMode | str = MaskMode.MIXED,
        query_index: torch.Tensor | None = None,
        validate: bool = True,
        add: torch.Tensor | None = None,
        defer_residual: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Apply the layer to jagged tokens.

        Args:
            x: ``[N, d_model]`` tokens of B samples; offsets ``[B+1]`` int64; token_type ``[N]``;
                timestamps ``[N]`` int64; group ``[N]`` int64; max_len host int (see ``hstu_attention``).
            mask_mode: ``mixed`` | ``causal`` | ``full``.
            query_index: ``[N_q]`` int64 distinct rows that are queries (a target layer: the T rows);
                ``None`` = every row (a full layer).
            validate: check values of offsets/types/rows/groups (host syncs); shapes are always checked.
            add: ``[N, d_model]`` or ``None``: the layer's input is ``x + add`` (the previous layer's deferred
                residual sum), summed by the input norm's kernel.
            defer_residual: a full layer returns ``(x, branch)`` whose sum is its output, for the next layer's
                input norm (or the backbone's output norm) to sum in its own pass (``add``): one pass over
                ``[N, d_model]`` less per layer. A target layer returns its output either way.

        Returns:
            ``[N, d_model]``: the query rows updated, every other row equal to ``x``; ``(x, branch)`` with
            ``defer_residual`` in a full layer.
        """
        c = self.config
        if x.dim() != 2 or x.shape[1] != c.d_model:
            raise RecfmError(f"HSTULayer: x must be [N, d_model={c.d_model}], got {tuple(x.shape)}")
        # x comes back through the norm: the residual path's gradient is summed in its backward kernel
        x_hat, x = self.norm_in(x, group, validate, out_dtype=autocast_dtype(x), pass_through=True, add=add)
        if query_index is None:
            x_q, group_q = x, group
            v, k, u, q = self._project(x_hat, (self.proj_vk, self.proj_uq), ("v", "k", "u", "q"))
        else:  # index_select: its backward is an index_add (no sort, no host sync)
            v, k = self._project(x_hat, (self.proj_vk,), ("v", "k"))
            x_q, group_q, x_hat_q = (t.index_select(0, query_index) for t in (x, group, x_hat))
            u, q = self._project(x_hat_q, (self.proj_uq,), ("u", "q"))

        out = hstu_attention(
            q.view(-1, c.num_heads, c.d_qk), k.view(-1, c.num_kv_heads, c.d_qk),
            v.view(-1, c.num_kv_heads, c.d_v), offsets,
            max_len=max_len, token_type=token_type, timestamps=timestamps, mask_mode=mask_mode,
            pos_bias=self.bias.pos_table, time_bias=self.bias.time_table,
            time_bucket_base=self.bias.time_bucket_base, alpha=c.attn_alpha, normaliser=c.normaliser,
            query_index=query_index, impl=resolve_impl(c.impl, q, ATTENTION_IMPLS), validate=validate,
        )  # [N_q, h, d_v]
        gated = self.dropout(self.norm_attn(out.flatten(1), group_q, validate, gate=u))
        # W_out through linear_silu with no SiLU: its backward sums the bias gradient's columns in one read of the
        # incoming gradient (autograd's column sum over [N, d_model] runs at about half the memory bandwidth)
        (proj,) = linear_silu(gated, [self.proj_out.weight], [self.proj_out.bias], [c.d_model], [False],
                              impl=resolve_impl(c.impl, gated, PROJ_IMPLS))
        if query_index is None and defer_residual:
            return x_q, proj
        y = x_q + proj
        return y if query_index is None else x.index_copy(0, query_index, y)
