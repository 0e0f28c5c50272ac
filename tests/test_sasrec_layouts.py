"""SASRec options: the "kang" block layout against a reference built from torch.nn.MultiheadAttention,
the activation / final-norm switches, the xavier init, and config validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recfm.errors import ConfigError
from recfm.foundation.model.sasrec import SASRec, SASRecConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def reference_kang(enc: SASRec, x: torch.Tensor) -> torch.Tensor:
    """One sample ``x [L, d]`` through Kang & McAuley's layout, written with nn.MultiheadAttention."""
    c = enc.config
    length = x.shape[0]
    h = x * c.d_model ** 0.5 + enc.positions.weight[:length]
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)  # True = masked
    for block in enc.blocks:
        mha = torch.nn.MultiheadAttention(c.d_model, c.num_heads, batch_first=True)
        mha.in_proj_weight.data.copy_(block.qkv.weight)
        mha.in_proj_bias.data.copy_(block.qkv.bias)
        mha.out_proj.weight.data.copy_(block.out.weight)
        mha.out_proj.bias.data.copy_(block.out.bias)
        q = block.norm_attn(h)
        attn, _ = mha(q[None], h[None], h[None], attn_mask=causal, need_weights=False)
        h = block.norm_ffn(q + attn[0])
        lin1, _, _, lin2 = block.ffn
        h = h + lin2(F.relu(lin1(h)))
    return h


def test_kang_layout_matches_a_multihead_attention_reference_on_jagged_input():
    torch.manual_seed(0)
    cfg = SASRecConfig(d_model=8, num_blocks=2, num_heads=2, dropout=0.0, max_len=6, layout="kang",
                       activation="relu", final_norm=False, init="xavier")
    enc = SASRec(cfg).eval()
    x = torch.randn(9, 8)
    offsets = torch.tensor([0, 4, 5, 9])
    out = enc(x, offsets, max_len=6)
    for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        torch.testing.assert_close(out[a:b], reference_kang(enc, x[a:b]), atol=1e-5, rtol=1e-5)


def test_final_norm_switch_and_default_layout_differ_from_kang():
    torch.manual_seed(0)
    x, offsets = torch.randn(5, 8), torch.tensor([0, 5])
    normed = SASRec(SASRecConfig(d_model=8, num_blocks=1, dropout=0.0, max_len=5)).eval()(x, offsets, 5)
    torch.testing.assert_close(normed.mean(-1), torch.zeros(5), atol=1e-5, rtol=0)  # LayerNorm output (gamma 1, beta 0)
    torch.manual_seed(0)
    raw = SASRec(SASRecConfig(d_model=8, num_blocks=1, dropout=0.0, max_len=5, final_norm=False)).eval()(x, offsets, 5)
    assert raw.mean(-1).abs().max() > 1e-3


def test_xavier_init_draws_positions_with_std_one_over_sqrt_d_truncated_at_two_std():
    torch.manual_seed(0)
    enc = SASRec(SASRecConfig(d_model=64, num_blocks=1, max_len=400, init="xavier"))
    w = enc.positions.weight
    bound = 2 / 64 ** 0.5
    assert w.abs().max() <= bound
    assert 0.7 * 64 ** -0.5 < w.std() < 0.95 * 64 ** -0.5  # a normal truncated at 2 std has std 0.88 sigma
    qkv = enc.blocks[0].qkv
    assert torch.count_nonzero(qkv.bias) == 0
    assert abs(qkv.weight.std().item() - (2 / (64 + 192)) ** 0.5) < 0.01  # xavier normal: sqrt(2 / (fan_in + fan_out))


def test_unknown_options_are_named():
    with pytest.raises(ConfigError, match="sasrec.layout"):
        SASRecConfig(layout="post")
    with pytest.raises(ConfigError, match="sasrec.activation"):
        SASRecConfig(activation="tanh")
    with pytest.raises(ConfigError, match="sasrec.init"):
        SASRecConfig(init="kaiming")
