"""Group LayerNorm in plain PyTorch: the specification the fused kernel is tested against.

Each row is normalised over its features (mean 0, variance 1, biased variance, ``eps`` inside the square
root), then scaled and shifted by the parameters of *its own* group::

    y_i = (x_i - mean(x_i)) / sqrt(var(x_i) + eps) * weight[group_i] + bias[group_i]

With a ``gate`` (``[N, d]``) the result is ``y * gate`` (HSTU's ``GLN(O) * U``), in the same precision.
With ``add`` the rows normalised are ``x + add``, summed as torch sums them (in the promoted dtype).
Computed in float32 (float64 when ``x`` is float64), returned in ``x``'s dtype or the ``out_dtype`` asked
for; works on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_layer_norm_reference(
    x: torch.Tensor,
    group: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    gate: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    pass_through: bool = False,
    add: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``x [N, d]``, ``group [N]`` int64, ``weight``/``bias [G, d]``, ``gate [N, d]`` or None -> ``[N, d]`` in
    ``out_dtype`` (default ``x``'s; inputs already validated)."""
    if add is not None:
        x = x + add
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    normed = F.layer_norm(x.to(dtype), (x.shape[1],), eps=eps)
    y = normed * weight.to(dtype)[group]
    if bias is not None:
        y = y + bias.to(dtype)[group]
    if gate is not None:
        y = y * gate.to(dtype)
    y = y.to(out_dtype or x.dtype)
    return (y, x) if pass_through else y
