"""The backbone: a stack of HSTU layers with hybrid target attention (MTFM), on jagged tokens.

::

    block 1:  full layer  -> target layer x K        full: every token is a query (H, R, T all updated)
    block 2:  full layer  -> target layer x K        target: only T tokens are queries; H/R pass through
    ...                                             (K/V from every token the mask allows)
    block B:  full layer  -> target layer x K
    final Group LayerNorm

With ``target_layers_per_block = 0`` this is a plain stack of ``num_blocks`` full layers. A target layer
costs ``O(L_T * L)`` per sample instead of ``O(L^2)``; because H and R tokens never see T tokens under the
mixed mask (:mod:`recfm.foundation.model.mask`), skipping their update in target layers changes nothing a
target can see except how deep H/R are encoded. ``mask_mode="causal"`` (next-item training over H) and
``"full"`` make every layer a full layer.

Shapes: ``x [N, d_model]``, offsets ``[B+1]`` int64, token_type ``[N]`` int8, timestamps ``[N]`` int64,
group ``[N]`` int64, max_len host int -- exactly the fields of :class:`recfm.foundation.data.batch.Batch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recfm.errors import ConfigError, RecfmError
from recfm.foundation.model.hstu import GroupLayerNorm, HSTUConfig, HSTULayer
from recfm.foundation.model.mask import MaskMode
from recfm.kernels.hstu_attention import validate_jagged
from recfm.scenarios.spec import TokenType


@dataclass(frozen=True)
class BackboneConfig:
    """``num_blocks`` blocks of 1 full + ``target_layers_per_block`` target layers (MTFM: 4 x (1 + 3))."""

    layer: HSTUConfig
    num_blocks: int = 1
    target_layers_per_block: int = 0
    final_norm: bool = True

    def __post_init__(self):
        problems = []
        if not isinstance(self.num_blocks, int) or self.num_blocks < 1:
            problems.append(f"backbone.num_blocks: must be an int >= 1, got {self.num_blocks!r}")
        if not isinstance(self.target_layers_per_block, int) or self.target_layers_per_block < 0:
            problems.append(f"backbone.target_layers_per_block: must be an int >= 0, got {self.target_layers_per_block!r}")
        if problems:
            raise ConfigError(problems)

    @property
    def num_layers(self) -> int:
        return self.num_blocks * (1 + self.target_layers_per_block)


class Backbone(nn.Module):
    """Hybrid-target-attention HSTU stack (module docstring)."""

    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(HSTULayer(config.layer) for _ in range(config.num_layers))
        per_block = 1 + config.target_layers_per_block
        self.is_target_layer = tuple(i % per_block != 0 for i in range(config.num_layers))
        c = config.layer
        self.norm_out = GroupLayerNorm(c.num_groups, c.d_model, c.norm_eps, c.impl) if config.final_norm else None

    def forward(
        self,
        x: torch.Tensor,
        offsets: torch.Tensor,
        token_type: torch.Tensor | None,
        timestamps: torch.Tensor | None,
        group: torch.Tensor,
        max_len: int,
        mask_mode: MaskMode | str = MaskMode.MIXED,
        target_index: torch.Tensor | None = None,
        validate: bool = True,
    ) -> torch.Tensor:
        """Encode jagged tokens.

        Args:
            x: ``[N, d_model]`` token embeddings; the other tensors as in the module docstring.
            mask_mode: ``mixed`` (user-level samples, hybrid layers) | ``causal`` | ``full``.
            target_index: ``[N_T]`` int64 rows of the T tokens (every T row once, any order), if the
                caller has them (saves one host sync); by default found from ``token_type``.
            validate: check the *values* of offsets, token types, target rows and groups (host syncs on a
                GPU). Pass ``False`` when they were checked on the host already, e.g. by
                :func:`recfm.foundation.data.device.check_batch` before the copy (the
                :class:`~recfm.foundation.data.device.DevicePrefetcher` does it): with ``target_index``
                given as well, the forward then needs no host synchronisation. Shapes are always checked.

        Returns:
            ``[N, d_model]``.
        """
        mode = MaskMode(mask_mode)
        if x.dim() != 2:
            raise RecfmError(f"Backbone: x must be [N, d_model], got {tuple(x.shape)}")
        if validate:
            validate_jagged(offsets, x.shape[0], max_len, token_type=token_type, query_index=target_index,
                            where="Backbone")
        if mode is MaskMode.MIXED and token_type is None:
            raise RecfmError("Backbone: mask_mode='mixed' needs token_type")
        hybrid = mode is MaskMode.MIXED and any(self.is_target_layer)
        if hybrid and target_index is None:
            target_index = torch.nonzero(token_type == int(TokenType.T)).squeeze(1)
        branch = None  # a full layer's output is x + branch, summed by the next norm (HSTULayer: defer_residual)
        for layer, is_target in zip(self.layers, self.is_target_layer):
            out = layer(
                x, offsets, token_type=token_type, timestamps=timestamps, group=group, max_len=max_len,
                mask_mode=mode, query_index=target_index if hybrid and is_target else None,
                validate=validate and layer is self.layers[0], add=branch, defer_residual=True,
            )
            x, branch = out if isinstance(out, tuple) else (out, None)
        if self.norm_out is not None:
            return self.norm_out(x, group, validate=False, add=branch)
        return x if branch is None else x + branch
