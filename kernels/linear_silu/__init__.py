"""The HSTU projection: ``SiLU(x W^T + b)`` split into its parts (U, V, Q, K), forward and backward.

Layout::

    x:       [N, d_in]             tokens
    weights: [out_i, d_in] each    Linear weights whose rows are stacked in this order (one matmul)
    biases:  [out_i] each, or None
    sizes:   part widths (sum = sum of out_i), e.g. V, K, U, Q of a full HSTU layer
    silu:    one flag per part: SiLU on that part or not (``HSTUConfig.silu_on``)
    out:     one [N, size] view per part, of one [N, sum(sizes)] tensor

Under autocast the matmul runs in the autocast dtype (as ``nn.Linear`` would) and so do the outputs.

``impl`` picks the implementation from ``IMPLS``:

* ``reference`` -- ``F.linear`` and ``F.silu`` (:mod:`.reference`), any device; the specification.
* ``triton`` (:mod:`.triton_impl`) -- the forward is one Triton matmul whose epilogue stores both the
  pre-activation and its SiLU (16-bit inputs on GPUs with TMA; cuBLAS and ``F.silu`` elsewhere); the
  backward's matmuls stay with cuBLAS and its elementwise work is one Triton kernel per part that reads
  the part's incoming gradient and the saved pre-activation and writes ``dpre = dy * SiLU'(pre)`` into its
  columns of one buffer, with the bias gradient's column sums in the same pass. Autograd would instead
  concatenate the parts' gradients, apply SiLU's backward to the whole, and sum the columns for the bias:
  three passes over ``[N, sum(sizes)]`` instead of one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from recfm.errors import RecfmError
from recfm.kernels.linear_silu.reference import linear_silu_reference


def _triton(x, weights, biases, sizes, silu):
    """Lazy entry of the Triton implementation (imports Triton on first call)."""
    from recfm.kernels.linear_silu.triton_impl import linear_silu_triton

    return linear_silu_triton(x, weights, biases, sizes, silu)


IMPLS = {"reference": linear_silu_reference, "triton": _triton}

__all__ = ["IMPLS", "autocast_dtype", "linear_silu"]


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype when autocast is on for ``x``'s device type (what an ``nn.Linear`` on ``x`` would
    compute in), else ``None``."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def linear_silu(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    sizes: Sequence[int],
    silu: Sequence[bool],
    impl: str = "reference",
) -> tuple[torch.Tensor, ...]:
    """``x @ cat(weights)^T + cat(biases)``, split into ``sizes`` columns, SiLU on the parts flagged in ``silu``.

    Args:
        x: ``[N, d_in]`` float.
        weights: ``[out_i, d_in]`` float tensors (e.g. ``nn.Linear.weight``), stacked by rows.
        biases: one ``[out_i]`` tensor or ``None`` per weight (all present or all ``None``).
        sizes: widths of the parts the result is split into; they sum to ``sum(out_i)``.
        silu: one flag per part.
        impl: a key of ``IMPLS``.

    Returns:
        One ``[N, size]`` tensor per part (column views of one result).

    Raises:
        RecfmError: naming the argument at fault, before any compute.
    """

    def fail(message: str) -> None:
        raise RecfmError(f"linear_silu: {message}")

    if impl not in IMPLS:
        fail(f"impl={impl!r} is not one of {sorted(IMPLS)}")
    if x.dim() != 2 or not x.dtype.is_floating_point:
        fail(f"x must be a floating [N, d_in] tensor, got {x.dtype} {tuple(x.shape)}")
    weights, biases, sizes, silu = tuple(weights), tuple(biases), tuple(sizes), tuple(bool(s) for s in silu)
    if not weights or len(biases) != len(weights):
        fail(f"need one bias (or None) per weight, got {len(weights)} weights and {len(biases)} biases")
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != x.shape[1] or not w.dtype.is_floating_point:
            fail(f"weights[{i}] must be a floating [out, d_in={x.shape[1]}] tensor, got {w.dtype} {tuple(w.shape)}")
        if w.device != x.device:
            fail(f"weights[{i}] is on {w.device} but x is on {x.device}")
    if any(b is None for b in biases) and not all(b is None for b in biases):
        fail("biases must be all tensors or all None")
    for i, (w, b) in enumerate(zip(weights, biases)):
        if b is not None and (b.shape != (w.shape[0],) or b.device != x.device):
            fail(f"biases[{i}] must be [{w.shape[0]}] on {x.device}, got {tuple(b.shape)} on {b.device}")
    out = sum(w.shape[0] for w in weights)
    if len(silu) != len(sizes) or any(not isinstance(s, int) or s < 1 for s in sizes) or sum(sizes) != out:
        fail(f"sizes {list(sizes)} must be positive ints summing to the {out} stacked output rows, "
             f"with one silu flag each (got {len(silu)})")
    return IMPLS[impl](x, weights, biases, sizes, silu)
