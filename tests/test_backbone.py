"""HSTU layer and hybrid-target-attention backbone: leak-proofness, permutation, jagged = one by one,
target layer = full layer on T rows, gradients, configuration errors."""

from __future__ import annotations

import random

import pytest
import torch

from recfm.errors import ConfigError, RecfmError
from recfm.foundation.model.backbone import Backbone, BackboneConfig
from recfm.foundation.model.hstu import HSTUConfig, HSTULayer

H, R, T = 0, 1, 2
D = 8
NUM_GROUPS = 5  # H kinds 0-1, R 2, T of scenario 0-1: 3-4


def layer_config(**overrides) -> HSTUConfig:
    base = dict(d_model=D, num_heads=2, num_kv_heads=1, d_qk=4, d_v=3, max_rel_pos=4, num_time_buckets=8,
                num_groups=NUM_GROUPS)
    return HSTUConfig(**{**base, **overrides})


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values everywhere (bias tables start at zero, norms at identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5
            p.copy_(1 + noise if name.endswith("norm_in.weight") or "norm_attn.weight" in name else noise)
    return module.eval()


def sample(n_h, r_times, t_times, rng):
    """One sample's token metadata in the batch layout (H, R by time, T)."""
    types = [H] * n_h + [R] * len(r_times) + [T] * len(t_times)
    stamps = sorted(rng.randint(0, 50) for _ in range(n_h)) + list(r_times) + list(t_times)
    group = [rng.randint(0, 1) for _ in range(n_h)] + [2] * len(r_times) + [rng.randint(3, 4) for _ in t_times]
    return types, stamps, group


def make_batch(samples, seed=0, dtype=torch.float64):
    """samples: list of (types, stamps, group) -> dict of Backbone keyword arguments."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [len(s[0]) for s in samples]
    return dict(
        x=torch.randn(sum(lengths), D, generator=gen, dtype=dtype),
        offsets=torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()]),
        token_type=torch.tensor([t for s in samples for t in s[0]], dtype=torch.int8),
        timestamps=torch.tensor([t for s in samples for t in s[1]], dtype=torch.int64),
        group=torch.tensor([g for s in samples for g in s[2]], dtype=torch.int64),
        max_len=max(lengths, default=0),
    )


def standard_samples(seed=0):
    rng = random.Random(seed)
    #          R: 10 11 11 13 15            T: 11 13 14 20
    first = sample(4, [100, 101, 101, 103, 105], [101, 103, 104, 110], rng)
    others = [sample(3, [100, 102], [101, 103], rng), sample(0, [], [], rng), sample(1, [], [100], rng),
              sample(5, [100, 100, 104], [], rng)]
    return [first, *others]


def hybrid_backbone(seed=0, **layer) -> Backbone:
    config = BackboneConfig(layer=layer_config(**layer), num_blocks=2, target_layers_per_block=2)
    return randomise(Backbone(config).double(), seed)


def altered(batch, rows, seed=1, stamps=False, groups=False):
    """A copy of the batch with the features (and optionally timestamps/groups) of `rows` changed."""
    out = dict(batch)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.tensor(rows, dtype=torch.int64)
    out["x"] = batch["x"].index_copy(0, rows, torch.randn(len(rows), D, generator=gen, dtype=batch["x"].dtype))
    if stamps:
        out["timestamps"] = batch["timestamps"].index_copy(0, rows, batch["timestamps"][rows] + 1000)
    if groups:
        out["group"] = batch["group"].index_copy(0, rows, 7 - batch["group"][rows])  # 3 <-> 4
    return out


# Rows of the first sample: H 0-3; R 4-8 at t = 100 101 101 103 105; T 9-12 at t = 101 103 104 110.
T_103, R_101_FIRST, R_101_SECOND = 10, 5, 6


@torch.no_grad()
def test_target_does_not_see_later_real_time_events_other_targets_or_samples():
    model, batch = hybrid_backbone(), make_batch(standard_samples())
    base = model(**batch)
    same = lambda b, rows: torch.testing.assert_close(model(**b)[rows], base[rows], rtol=0, atol=1e-12)  # noqa: E731
    # later R events (t = 103 is not strictly before the exposure at 103, t = 105 is after it)
    same(altered(batch, [7, 8]), [T_103])
    # other targets of the same sample: features, timestamps and scenario groups
    same(altered(batch, [9, 11, 12], stamps=True, groups=True), [T_103])
    # other samples: features, and their lengths (drop a whole sample)
    same(altered(batch, list(range(13, batch["x"].shape[0]))), list(range(13)))
    short = make_batch(standard_samples()[:2])
    torch.testing.assert_close(model(**short)[:13], base[:13], rtol=0, atol=1e-12)
    # H tokens see only H
    same(altered(batch, list(range(4, 13)), stamps=True), [0, 1, 2, 3])
    # the test can fail: an earlier R event (t = 101 < 103) and an H event do change the target
    for rows in ([R_101_SECOND], [2]):
        assert not torch.allclose(model(**altered(batch, rows))[T_103], base[T_103])


@torch.no_grad()
def test_real_time_token_does_not_see_later_real_time_events():
    model, batch = hybrid_backbone(seed=3), make_batch(standard_samples())
    base = model(**batch)
    # R at t=101 (first): later are the tie at 101 with a later position, 103 and 105; and every target
    out = model(**altered(batch, [R_101_SECOND, 7, 8, 9, 10, 11, 12]))
    torch.testing.assert_close(out[R_101_FIRST], base[R_101_FIRST], rtol=0, atol=1e-12)
    assert not torch.allclose(model(**altered(batch, [4]))[R_101_FIRST], base[R_101_FIRST])
    assert not torch.allclose(model(**altered(batch, [R_101_FIRST]))[R_101_SECOND], base[R_101_SECOND])


@torch.no_grad()
def test_keys_normaliser_makes_outputs_independent_of_hidden_token_counts():
    rng = random.Random(0)
    h_part = sample(4, [], [], rng)
    full = [(h_part[0] + [R] * 3 + [T] * 3, h_part[1] + [100, 103, 105] + [101, 103, 104], h_part[2] + [2, 2, 2, 3, 4, 3])]
    fewer = [(h_part[0] + [R] + [T], h_part[1] + [100] + [103], h_part[2] + [2, 4])]  # no later R, no other T
    batch_full, batch_fewer = make_batch(full), make_batch(fewer)
    batch_fewer["x"] = batch_full["x"][[0, 1, 2, 3, 4, 8]]
    for normaliser, independent in (("keys", True), ("length", False)):
        model = hybrid_backbone(normaliser=normaliser)
        a, b = model(**batch_full)[8], model(**batch_fewer)[5]  # the exposure at t=103
        assert torch.allclose(a, b, rtol=0, atol=1e-12) == independent, normaliser


@torch.no_grad()
def test_permuting_targets_permutes_their_outputs_and_nothing_else():
    model, batch = hybrid_backbone(seed=4), make_batch(standard_samples())
    base = model(**batch)
    perm = torch.arange(batch["x"].shape[0])
    perm[9:13] = torch.tensor([12, 9, 11, 10])
    permuted = {k: (v[perm] if k in ("x", "token_type", "timestamps", "group") else v) for k, v in batch.items()}
    torch.testing.assert_close(model(**permuted), base[perm])


@torch.no_grad()
def test_jagged_batch_equals_samples_one_by_one():
    model, samples = hybrid_backbone(seed=5), standard_samples()
    batch = make_batch(samples)
    out = model(**batch)
    for b, (s, e) in enumerate(zip(batch["offsets"][:-1].tolist(), batch["offsets"][1:].tolist())):
        one = {k: v[s:e] for k, v in batch.items() if k in ("x", "token_type", "timestamps", "group")}
        single = model(**one, offsets=torch.tensor([0, e - s]), max_len=e - s)
        torch.testing.assert_close(out[s:e], single)


@torch.no_grad()
def test_target_layer_equals_full_layer_restricted_to_target_rows():
    layer, batch = randomise(HSTULayer(layer_config()).double(), 6), make_batch(standard_samples())
    kwargs = {k: v for k, v in batch.items() if k != "x"}
    full = layer(batch["x"], **kwargs)
    targets = torch.nonzero(batch["token_type"] == T).squeeze(1)
    shuffled = targets[torch.randperm(targets.numel(), generator=torch.Generator().manual_seed(0))]
    out = layer(batch["x"], **kwargs, query_index=shuffled)
    torch.testing.assert_close(out[targets], full[targets])
    not_targets = batch["token_type"] != T
    assert torch.equal(out[not_targets], batch["x"][not_targets])


@torch.no_grad()
def test_k0_is_the_full_stack_and_hybrid_is_full_then_target_layers():
    batch = make_batch(standard_samples())
    plain = randomise(Backbone(BackboneConfig(layer=layer_config(), num_blocks=3)).double(), 7)
    kwargs = {k: v for k, v in batch.items() if k != "x"}
    x = batch["x"]
    for layer in plain.layers:
        x = layer(x, **kwargs)
    torch.testing.assert_close(plain(**batch), plain.norm_out(x, batch["group"]))

    hybrid = randomise(Backbone(BackboneConfig(layer=layer_config(), num_blocks=2, target_layers_per_block=1)).double(), 8)
    is_target = (batch["token_type"] == T)[:, None]
    x = batch["x"]
    for i, layer in enumerate(hybrid.layers):  # full, target, full, target
        x = torch.where(is_target, layer(x, **kwargs), x) if i % 2 else layer(x, **kwargs)
    torch.testing.assert_close(hybrid(**batch), hybrid.norm_out(x, batch["group"]))
    # causal mode makes every layer a full layer
    x = batch["x"]
    for layer in hybrid.layers:
        x = layer(x, **kwargs, mask_mode="causal")
    torch.testing.assert_close(hybrid(**batch, mask_mode="causal"), hybrid.norm_out(x, batch["group"]))


@torch.no_grad()
def test_causal_mode_does_not_see_the_future():
    model = hybrid_backbone(seed=9)
    rng = random.Random(1)
    batch = make_batch([sample(6, [], [], rng), sample(4, [], [], rng)])
    base = model(**batch, mask_mode="causal")
    out = model(**altered(batch, [3, 4, 5]), mask_mode="causal")
    torch.testing.assert_close(out[:3], base[:3], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[6:], base[6:], rtol=0, atol=1e-12)
    assert not torch.allclose(out[3], base[3])


@torch.no_grad()
def test_empty_and_length_one_samples():
    rng = random.Random(2)
    model = hybrid_backbone(seed=10)
    samples = [sample(0, [], [], rng), sample(0, [], [7], rng), sample(1, [], [], rng), sample(0, [], [], rng)]
    batch = make_batch(samples)
    out = model(**batch)
    assert out.shape == (2, D) and torch.isfinite(out).all()
    single = {**make_batch(samples[1:2]), "x": batch["x"][:1]}
    torch.testing.assert_close(out[:1], model(**single))
    empty = make_batch([sample(0, [], [], rng)] * 3)
    assert model(**empty).shape == (0, D)


def test_gradcheck_whole_layer():
    rng = random.Random(3)
    batch = make_batch([sample(2, [5, 6], [6], rng), sample(0, [], [], rng), sample(1, [], [3, 4], rng)])
    layer = randomise(HSTULayer(layer_config(d_qk=2, d_v=2, max_rel_pos=2, num_time_buckets=4)).double(), 11)
    kwargs = {k: v for k, v in batch.items() if k != "x"}
    names = ["proj_uq.weight", "proj_vk.weight", "bias.pos_table", "bias.time_table", "norm_in.weight",
             "norm_attn.bias", "proj_out.weight"]
    params = dict(layer.named_parameters())
    targets = torch.tensor([6, 4, 7])

    def run(x, *values, query_index=None):
        return torch.func.functional_call(layer, dict(zip(names, values)), (x,),
                                          {**kwargs, "query_index": query_index})

    inputs = [batch["x"].requires_grad_()] + [params[n].detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(run, inputs)
    assert torch.autograd.gradcheck(lambda *a: run(*a, query_index=targets), inputs)


def test_config_errors_are_collected_and_inputs_checked():
    with pytest.raises(ConfigError) as err:
        HSTUConfig(d_model=0, num_heads=3, num_kv_heads=2, normaliser="mean", silu_on=("u", "w"), impl="cuda9")
    text = str(err.value)
    for key in ("hstu.d_model", "hstu.num_kv_heads", "hstu.normaliser", "hstu.silu_on", "hstu.impl"):
        assert key in text
    with pytest.raises(ConfigError, match="backbone.target_layers_per_block"):
        BackboneConfig(layer=layer_config(), target_layers_per_block=-1)
    model, batch = hybrid_backbone(), make_batch(standard_samples())
    with pytest.raises(RecfmError, match="end at N"):
        model(**{**batch, "offsets": batch["offsets"][:-1]})
    with pytest.raises(RecfmError, match="group ids"):
        model(**{**batch, "group": batch["group"] + 3})
    with pytest.raises(RecfmError, match="d_model=8"):
        model.layers[0](batch["x"][:, :4], **{k: v for k, v in batch.items() if k != "x"})


@pytest.mark.parametrize("autocast", [False, True])
def test_triton_kernels_match_reference_in_a_hybrid_backbone(autocast):
    """Every kernel of a layer (Group LayerNorm with its strided gate, the stacked projection with its fused
    backward, the attention) through ``impl="triton"`` (CPU: Triton's interpreter) against ``reference``: full
    and target layers, forward and backward. Under bf16 autocast ``x_hat`` is written in bf16 and read by the
    projection as it is; the reference casts a float32 copy, so the two agree to bf16 rounding."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = {k: v.to(device) if torch.is_tensor(v) else v
             for k, v in make_batch(standard_samples(), dtype=torch.float32).items()}
    kwargs = {k: v for k, v in batch.items() if k != "x"}
    results = {}
    for impl in ("reference", "triton"):
        config = BackboneConfig(layer=layer_config(impl=impl), num_blocks=1, target_layers_per_block=1)
        model = randomise(Backbone(config), 4).to(device)
        x = batch["x"].clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out = model(x, **kwargs)
        out.float().pow(2).sum().backward()
        results[impl] = [out.float(), x.grad, *(p.grad for p in model.parameters())]
    tol = 3e-2 if autocast else 1e-4
    for name, got, want in zip(["out", "dx", *(n for n, _ in model.named_parameters())], results["triton"],
                               results["reference"]):
        scale = want.abs().max().clamp(min=1).item()
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")
