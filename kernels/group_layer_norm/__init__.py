"""Group LayerNorm: a LayerNorm whose affine parameters are chosen per token group (MTGR).

Layout::

    x:      [N, d]      tokens of B samples concatenated
    group:  [N] int64   group of each token (H kind, R, T of a scenario: see recfm.foundation.data.batch)
    weight: [G, d]      one scale row per group
    bias:   [G, d]      one shift row per group (or None)
    gate:   [N, d]      optional: out = GLN(x) * gate, fused (HSTU's GLN(O) * U); may be a column slice
    add:    [N, d]      optional: the rows normalised are x + add (a residual branch summed in the same pass)
    out:    [N, d]      in x's dtype, or out_dtype (e.g. bf16 for a bf16 matmul after it: no cast pass)

The math is in :mod:`.reference`; ``impl`` picks the implementation from ``IMPLS``:

* ``reference`` -- plain PyTorch (:mod:`.reference`), any device; the specification.
* ``triton`` -- fused forward/backward kernels (:mod:`.triton_impl`); CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``. Triton is imported on first use, so recfm imports without it.
"""

from __future__ import annotations

import torch

from recfm.errors import RecfmError
from recfm.kernels.group_layer_norm.reference import group_layer_norm_reference


def _triton(x: torch.Tensor, group: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            eps: float, gate: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
            pass_through: bool = False, add: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Lazy entry of the Triton implementation (imports Triton on first call)."""
    from recfm.kernels.group_layer_norm.triton_impl import group_layer_norm_triton

    return group_layer_norm_triton(x, group, weight, bias, eps, gate, out_dtype, pass_through, add)


IMPLS = {"reference": group_layer_norm_reference, "triton": _triton}

__all__ = ["IMPLS", "group_layer_norm"]


def group_layer_norm(
    x: torch.Tensor,
    group: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    impl: str = "reference",
    validate: bool = True,
    gate: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    pass_through: bool = False,
    add: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Normalise each row of ``x`` (of ``x + add``) and apply its group's affine parameters.

    Args:
        x: ``[N, d]`` float.
        group: ``[N]`` int64 group id of each row, in ``[0, G)``.
        weight: ``[G, d]`` float.
        bias: ``[G, d]`` float, or ``None``.
        eps: added to the variance.
        impl: a key of ``IMPLS``.
        validate: also check that group ids are in range (one host sync); shapes, dtypes and devices are
            always checked. Everything is checked before any compute.
        gate: ``[N, d]`` float or ``None``; when given the result is ``GLN(x) * gate`` in one pass.
        out_dtype: floating dtype of the result; ``None`` = ``x``'s. Statistics and affine stay in float32
            either way: under autocast a layer passes the autocast dtype, so the matmul that follows reads
            the result as it is instead of casting a float32 copy (the gradient comes back in that dtype).

        pass_through: also return ``x`` itself, for a layer's residual path: its gradient then comes back to
            this function's backward, which (Triton) adds it to its own in the same pass instead of autograd
            summing the two full-size gradients.
        add: ``[N, d]`` float or ``None``; when given the rows normalised are ``s = x + add`` (in the dtype
            ``x + add`` has), summed in the same pass: a residual stream and the branch just computed, as the
            next layer's input norm reads them, without a separate sum over ``[N, d]``. ``s`` then takes
            ``x``'s place everywhere, the second output of ``pass_through`` included.

    Returns:
        ``[N, d]`` in ``out_dtype`` (default ``x``'s dtype, or ``s``'s); with ``pass_through``, ``(that, x)``
        (``(that, s)`` with ``add``).

    Raises:
        RecfmError: naming the argument at fault.
    """

    def fail(message: str) -> None:
        raise RecfmError(f"group_layer_norm: {message}")

    if impl not in IMPLS:
        fail(f"impl={impl!r} is not one of {sorted(IMPLS)}")
    if x.dim() != 2 or not x.dtype.is_floating_point:
        fail(f"x must be a floating [N, d] tensor, got {x.dtype} {tuple(x.shape)}")
    n, d = x.shape
    if group.shape != (n,) or group.dtype != torch.int64:
        fail(f"group must be int64 [N={n}], got {group.dtype} {tuple(group.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.dim() != 2 or p.shape[1] != d or p.shape[0] < 1 or not p.dtype.is_floating_point):
            fail(f"{name} must be a floating [G, d={d}] tensor, got {p.dtype} {tuple(p.shape)}")
    if bias is not None and bias.shape != weight.shape:
        fail(f"weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must have the same shape")
    if gate is not None and (gate.shape != x.shape or not gate.dtype.is_floating_point):
        fail(f"gate must be a floating tensor of x's shape {tuple(x.shape)}, got {gate.dtype} {tuple(gate.shape)}")
    if add is not None and (add.shape != x.shape or not add.dtype.is_floating_point):
        fail(f"add must be a floating tensor of x's shape {tuple(x.shape)}, got {add.dtype} {tuple(add.shape)}")
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        fail(f"out_dtype must be a floating torch.dtype or None, got {out_dtype!r}")
    for name, t in (("group", group), ("weight", weight), ("bias", bias), ("gate", gate), ("add", add)):
        if t is not None and t.device != x.device:
            fail(f"{name} is on {t.device} but x is on {x.device}")
    if validate and n and (int(group.min()) < 0 or int(group.max()) >= weight.shape[0]):
        fail(f"group ids must be in [0, {weight.shape[0]}), got {int(group.min())} .. {int(group.max())}")
    if gate is None and out_dtype in (None, x.dtype) and not pass_through and add is None:
        return IMPLS[impl](x, group, weight, bias, float(eps))
    return IMPLS[impl](x, group, weight, bias, float(eps), gate, out_dtype, pass_through, add)
