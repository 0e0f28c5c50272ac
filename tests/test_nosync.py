"""No host-device synchronisation in a training step on a GPU, and the per-call kernel choice (``impl="auto"``).

The GPU tests run under ``torch.cuda.set_sync_debug_mode("error")``: any synchronising CUDA call
(``.item()``, ``.tolist()``, ``nonzero``, a blocking copy, ...) raises.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from recfm.foundation.data.batch import Batch, TargetGroup, TokenGroup
from recfm.foundation.data.device import DevicePrefetcher, target_rows
from recfm.foundation.model.backbone import Backbone, BackboneConfig
from recfm.foundation.model.hstu import GroupLayerNorm, HSTUConfig, HSTULayer, resolve_impl, triton_available
from recfm.heads.mmoe import MMoEHead, weighted_mean
from recfm.kernels.group_layer_norm import IMPLS as GLN_IMPLS
from recfm.kernels.group_layer_norm import group_layer_norm
from recfm.kernels.hstu_attention import IMPLS as ATTENTION_IMPLS
from recfm.scenarios.spec import FeatureSpec, FeatureType, LabelSpec, ScenarioSpec, TaskSpec, TaskType

FEATURES = 6
SCENARIOS = tuple(
    ScenarioSpec(name, (FeatureSpec("f", FeatureType.DENSE, length=FEATURES),), (LabelSpec("click"),),
                 (TaskSpec("ctr", TaskType.BINARY, "click"),))
    for name in ("feed", "coupon")
)


# ------------------------------------------------------------------------------------------- impl choice
def test_auto_resolves_per_call_from_the_tensors():
    both = {"reference": None, "triton": None}
    cpu = torch.zeros(2, 3)
    assert resolve_impl("auto", cpu, both) == "reference"
    assert resolve_impl("reference", cpu, both) == "reference"
    assert resolve_impl("triton", cpu, both) == "triton"  # explicit names are honoured (e.g. the interpreter)
    assert resolve_impl("dense", cpu, both) == "reference"  # a name this op lacks: "auto" for this op
    assert HSTUConfig(d_model=8).impl == "auto"
    if torch.cuda.is_available():
        gpu = cpu.cuda()
        assert resolve_impl("auto", gpu, both) == ("triton" if triton_available() else "reference")
        assert resolve_impl("auto", gpu.double(), both) == "reference"  # float64 (gradcheck) stays reference
        assert resolve_impl("auto", gpu, {"reference": None}) == "reference"


# ------------------------------------------------------------------------------------------- GPU step
def host_batch(num_samples: int = 6, seed: int = 0) -> Batch:
    """Samples of H (2 kinds), R and T tokens (2 scenarios) with dense features, built on the host."""
    gen = torch.Generator().manual_seed(seed)
    types, group, stamps, kind_rows, scen_rows, sample_of = [], [], [], {0: [], 1: []}, {0: [], 1: []}, {0: [], 1: []}
    offsets = [0]
    for b in range(num_samples):
        n_h, n_r = int(torch.randint(0, 9, (1,), generator=gen)), int(torch.randint(0, 3, (1,), generator=gen))
        n_t = [int(torch.randint(0, 3, (1,), generator=gen)) for _ in range(2)]
        n_t[b % 2] += 1  # every sample has a target
        for i in range(n_h + n_r):
            kind = int(torch.randint(0, 2, (1,), generator=gen))
            kind_rows[kind].append(len(types))
            types.append(0 if i < n_h else 1)
            group.append(kind if i < n_h else 2)
            stamps.append(100 * b + i)
        for s in range(2):
            for _ in range(n_t[s]):
                scen_rows[s].append(len(types))
                sample_of[s].append(b)
                types.append(2)
                group.append(3 + s)
                stamps.append(100 * b + 50)
        offsets.append(len(types))
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]

    def dense(n):
        return torch.randn(n, FEATURES, generator=gen)

    events = {name: TokenGroup(name, torch.tensor(kind_rows[k], dtype=torch.long), None, torch.zeros(len(kind_rows[k]), 0),
                               dense(len(kind_rows[k]))) for k, name in enumerate(("clicks", "orders"))}
    targets = {}
    for s, spec in enumerate(SCENARIOS):
        n = len(scen_rows[s])
        targets[spec.name] = TargetGroup(
            spec.name, torch.tensor(scen_rows[s], dtype=torch.long), None, torch.zeros(n, 0), dense(n),
            sample_index=torch.tensor(sample_of[s], dtype=torch.long), user_id=torch.tensor(sample_of[s], dtype=torch.long),
            exposure_id=torch.arange(n), labels={"click": torch.randint(0, 2, (n,), generator=gen).float()},
        )
    return Batch(offsets=torch.tensor(offsets), token_type=torch.tensor(types, dtype=torch.int8),
                 timestamps=torch.tensor(stamps, dtype=torch.int64), group=torch.tensor(group), user_id=torch.arange(num_samples),
                 events=events, targets=targets, scenarios=tuple(s.name for s in SCENARIOS), sequences=("clicks", "orders"),
                 max_len=max(lengths), num_targets=sum(len(r) for r in scen_rows.values()))


class TinyModel(nn.Module):
    """Dense features -> per-group Linear -> hybrid backbone -> MMoE (the shape of a real training step)."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.embed = nn.ModuleDict({name: nn.Linear(FEATURES, d) for name in ("clicks", "orders", "feed", "coupon")})
        layer = HSTUConfig(d_model=d, num_heads=2, num_kv_heads=1, d_qk=16, d_v=16, num_groups=5, impl="auto")
        self.backbone = Backbone(BackboneConfig(layer=layer, num_blocks=2, target_layers_per_block=1))
        self.head = MMoEHead(SCENARIOS, d, num_experts=2, expert_dim=16, tower_dim=8)

    def forward(self, batch: Batch) -> torch.Tensor:
        x = torch.zeros(batch.num_tokens, self.backbone.config.layer.d_model, device=batch.offsets.device)
        for name, g in {**batch.events, **batch.targets}.items():
            x = x.index_copy(0, g.token_index, self.embed[name](g.dense).to(x.dtype))  # bf16 under autocast
        y = self.backbone(x, batch.offsets, batch.token_type, batch.timestamps, batch.group, batch.max_len,
                          target_index=target_rows(batch), validate=False)
        logits = self.head({s: y[g.token_index] for s, g in batch.targets.items()})
        return weighted_mean(self.head.losses(logits, batch.targets))


@pytest.mark.gpu
def test_group_layer_norm_and_prefetch_do_not_sync():
    if not triton_available():
        pytest.skip("triton is not installed")
    batches = [host_batch(seed=i).pin_memory() for i in range(3)]
    w = torch.randn(5, 24, device="cuda", requires_grad=True)
    b = torch.randn(5, 24, device="cuda", requires_grad=True)
    warm = next(iter(DevicePrefetcher(batches[:1], "cuda")))
    x0 = torch.randn(warm.num_tokens, 24, device="cuda", requires_grad=True)
    group_layer_norm(x0, warm.group, w, b, impl="triton", validate=False).sum().backward()  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in DevicePrefetcher(batches, "cuda"):
            x = torch.randn(batch.num_tokens, 24, device="cuda", requires_grad=True)
            y = group_layer_norm(x, batch.group, w, b, impl="triton", validate=False)
            (y.float() ** 2).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    host = batches[-1]
    ref = group_layer_norm(x.detach().cpu(), host.group, w.detach().cpu(), b.detach().cpu(), impl="reference")
    torch.testing.assert_close(y.detach().cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_training_step_does_not_sync():
    if "triton" not in ATTENTION_IMPLS or not triton_available():
        pytest.skip("HSTU attention has no Triton implementation here (the reference reads offsets on the host)")
    assert "triton" in GLN_IMPLS
    torch.manual_seed(0)
    model = TinyModel().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [host_batch(seed=i).pin_memory() for i in range(4)]

    def step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for batch in DevicePrefetcher(batches[:2], "cuda"):  # compile kernels, create optimizer state
        step(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step(batch) for batch in DevicePrefetcher(batches, "cuda")]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(l).item() for l in losses)


def set_impl(model: nn.Module, impl: str) -> None:
    """Switch every HSTU layer and Group LayerNorm of ``model`` to ``impl``."""
    for m in model.modules():
        if isinstance(m, HSTULayer):
            m.config = replace(m.config, impl=impl)
        if isinstance(m, GroupLayerNorm):
            m.impl = impl


@pytest.mark.gpu
def test_auto_step_matches_reference_step_on_gpu():
    """The same model with impl="auto" (Triton where registered) and impl="reference": loss and gradients."""
    torch.manual_seed(0)
    model = TinyModel().cuda()
    batch = host_batch(num_samples=8, seed=5).to("cuda")
    results = []
    for impl in ("auto", "reference"):
        set_impl(model, impl)
        model.zero_grad(set_to_none=True)
        loss = model(batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.detach().clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_r, grads_r) = results
    torch.testing.assert_close(loss_a, loss_r, rtol=1e-3, atol=1e-4)
    for ga, gr in zip(grads_a, grads_r):
        torch.testing.assert_close(ga, gr, rtol=1e-2, atol=1e-2 * gr.abs().max().clamp(min=1e-3).item())


@pytest.mark.gpu
def test_merged_copy_to_cuda_equals_host_batch():
    host = host_batch().pin_memory()
    moved = host.to("cuda", non_blocking=True)
    assert moved.offsets.is_cuda and moved.targets["feed"].dense.is_cuda
    ptrs = {t.untyped_storage().data_ptr() for t in (moved.offsets, moved.group, moved.targets["coupon"].labels["click"])}
    assert len(ptrs) == 1
    torch.cuda.synchronize()
    for a, b in ((host.offsets, moved.offsets), (host.token_type, moved.token_type), (host.timestamps, moved.timestamps),
                 (host.events["orders"].dense, moved.events["orders"].dense),
                 (host.targets["feed"].labels["click"], moved.targets["feed"].labels["click"])):
        assert a.dtype == b.dtype and torch.equal(a, b.cpu())


def test_host_batch_is_valid_and_cpu_step_runs():
    """The same model and batch builder on CPU (reference kernels), with the host-side checks."""
    from recfm.foundation.data.device import check_batch

    batch = host_batch()
    check_batch(batch)
    model = TinyModel()
    loss = model(next(iter(DevicePrefetcher([batch], "cpu"))))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.backbone.parameters())
