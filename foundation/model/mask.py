"""The attention mask of the backbone as a pointwise predicate (brief section 3).

Whether query token ``i`` may attend key token ``j`` of the *same sample* is a function of six numbers only::

    allowed(type_i, type_j, t_i, t_j, pos_i, pos_j)

(``type`` a :class:`~recfm.scenarios.spec.TokenType`, ``t`` unix seconds, ``pos`` the token's index inside its
sample). Tokens of different samples never see each other; that is the jagged layout's job, not the
predicate's. Because the predicate is pointwise, a fused kernel evaluates it per tile from the tokens' types,
timestamps and positions, without ever building an ``N x N`` tensor; the reference materialises one
``[L_q, L]`` block per sample with :func:`sample_mask`.

Modes (:class:`MaskMode`):

* ``mixed`` -- the dynamic mixed mask of user-level samples::

                       key j:  H                R                                 T
      query i = H              yes              no                                no
      query i = R              yes              (t_j, pos_j) <= (t_i, pos_i)      no
      query i = T              yes              t_j < t_i                         j == i

  H is the past: every token sees every H token, and H queries see only H (no causality *inside* H in this
  mode; H is one bag of past events). R is causal in time; between two R tokens a timestamp tie is broken
  by position, and an R token sees itself. An exposure (T) sees only real-time events *strictly* before it
  (an exposure logged in the same second as a click cannot see that click) and itself; targets never see
  each other, in the same or another scenario.
* ``causal`` -- next-item training over one sequence: ``pos_j <= pos_i``.
* ``full`` -- everything in the sample (tests and ablations).
"""

from __future__ import annotations

import enum

import torch

from recfm.scenarios.spec import TokenType


class MaskMode(str, enum.Enum):
    """Which predicate decides who sees whom (module docstring)."""

    MIXED = "mixed"
    CAUSAL = "causal"
    FULL = "full"


def allowed(
    mode: MaskMode | str,
    type_i: torch.Tensor | None,
    type_j: torch.Tensor | None,
    t_i: torch.Tensor | None,
    t_j: torch.Tensor | None,
    pos_i: torch.Tensor,
    pos_j: torch.Tensor,
) -> torch.Tensor:
    """The mask predicate, elementwise with broadcasting.

    Args:
        mode: ``mixed``, ``causal`` or ``full``.
        type_i, type_j: integer token types (``TokenType``) of query and key; unused (may be ``None``)
            unless ``mode`` is ``mixed``.
        t_i, t_j: int64 timestamps of query and key; unused (may be ``None``) unless ``mode`` is ``mixed``.
        pos_i, pos_j: int64 positions of query and key inside their (common) sample.

    Returns:
        bool tensor of the broadcast shape: ``True`` where the query may attend the key.
    """
    mode = MaskMode(mode)
    if mode is MaskMode.FULL:
        return torch.ones(torch.broadcast_shapes(pos_i.shape, pos_j.shape), dtype=torch.bool, device=pos_i.device)
    if mode is MaskMode.CAUSAL:
        return pos_j <= pos_i
    if type_i is None or type_j is None or t_i is None or t_j is None:
        raise ValueError("the mixed mask needs token types and timestamps of queries and keys")
    h, r, t = int(TokenType.H), int(TokenType.R), int(TokenType.T)
    key_h = type_j == h
    earlier_or_same = (t_j < t_i) | ((t_j == t_i) & (pos_j <= pos_i))
    key_r_for_r = (type_j == r) & (type_i == r) & earlier_or_same
    key_r_for_t = (type_j == r) & (type_i == t) & (t_j < t_i)
    key_t_itself = (type_j == t) & (pos_j == pos_i)
    return key_h | key_r_for_r | key_r_for_t | key_t_itself


def sample_mask(
    mode: MaskMode | str,
    length: int,
    token_type: torch.Tensor | None = None,
    timestamps: torch.Tensor | None = None,
    query_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``[L_q, L]`` bool mask of one sample of ``L = length`` tokens.

    Args:
        mode: mask mode.
        length: ``L``, the sample's token count.
        token_type: ``[L]`` token types of the sample (needed by ``mixed`` only).
        timestamps: ``[L]`` int64 timestamps of the sample (needed by ``mixed`` only).
        query_pos: ``[L_q]`` int64 positions (inside the sample) of the query tokens; ``None`` = all ``L``.

    Returns:
        ``[L_q, L]`` bool, row ``a`` for query ``query_pos[a]``, column ``j`` for key ``j``.
    """
    device = next((x.device for x in (token_type, timestamps, query_pos) if x is not None), None)
    key_pos = torch.arange(length, device=device)
    if query_pos is None:
        query_pos = key_pos

    def query_and_key(values: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if values is None:
            return None, None
        return values[query_pos][:, None], values[None, :]

    type_i, type_j = query_and_key(token_type)
    t_i, t_j = query_and_key(timestamps)
    return allowed(mode, type_i, type_j, t_i, t_j, query_pos[:, None], key_pos[None, :])
