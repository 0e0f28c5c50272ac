"""The HSTU projection in plain PyTorch: the specification the Triton backward is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_silu_reference(x, weights, biases, sizes, silu) -> tuple[torch.Tensor, ...]:
    """``SiLU(x @ cat(weights)^T + cat(biases))`` split into ``sizes`` (inputs already validated)."""
    weight = torch.cat(weights) if len(weights) > 1 else weights[0]
    bias = None if biases[0] is None else (torch.cat(biases) if len(biases) > 1 else biases[0])
    out = F.linear(x, weight, bias)
    if all(silu):
        return F.silu(out).split(list(sizes), dim=1)
    return tuple(F.silu(t) if act else t for t, act in zip(out.split(list(sizes), dim=1), silu))
