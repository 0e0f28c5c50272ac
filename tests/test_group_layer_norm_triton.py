"""The Triton Group LayerNorm (forward and backward) against the PyTorch reference.

Runs on CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set here before Triton is imported when
there is no CUDA device) and on CUDA when one is present. Skipped when Triton is not installed.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels module imports triton

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install recfm[kernels])", allow_module_level=True)

from recfm.errors import RecfmError  # noqa: E402
from recfm.kernels.group_layer_norm import IMPLS, group_layer_norm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRAD_DTYPE = torch.float64 if DEVICE == "cpu" else torch.float32


def _case(n: int, d: int, groups: int, dtype: torch.dtype, seed: int, sorted_groups: bool = False):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=gen) * 2 + 0.5).to(dtype)
    group = torch.randint(0, groups, (n,), generator=gen)
    if sorted_groups:  # long runs of one group, as in a real batch (H kind runs, R, T per scenario)
        group = group.sort().values
    weight = 1 + 0.5 * torch.randn(groups, d, generator=gen)
    bias = 0.5 * torch.randn(groups, d, generator=gen)
    dy = torch.randn(n, d, generator=gen).to(dtype)
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return to(x), to(group), to(weight), to(bias), to(dy)


def _run(impl, x, group, weight, bias, dy, gate=None):
    """Output and gradients for x, weight, bias, gate (bias and gate may be None, then left out)."""
    given = {"x": x, "weight": weight, "bias": bias, "gate": gate}
    leaves = {k: t.detach().clone().requires_grad_() for k, t in given.items() if t is not None}
    y = group_layer_norm(leaves["x"], group, leaves["weight"], leaves.get("bias"), impl=impl, gate=leaves.get("gate"))
    grads = torch.autograd.grad(y, list(leaves.values()), dy)
    return (y, *grads)


def _expected(x, group, weight, bias, dy, gate=None):
    """The reference evaluated in high precision on the same (rounded) inputs."""
    up = lambda t: None if t is None else t.to(GRAD_DTYPE)  # noqa: E731
    return _run("reference", up(x), group, up(weight), up(bias), up(dy), up(gate))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, d, groups, sorted_groups", [
    (37, 24, 3, False),   # rows not a multiple of the block (16 rows x 32 columns), d not a power of two
    (5, 7, 2, False),     # fewer rows than one block, odd d
    (200, 8, 5, True),    # several tiles per program, group runs crossing tile edges
    (40, 48, 3, False),   # 48 -> 64-wide block, 3 tiles (the last one partial)
    (1, 16, 1, False),    # one row, one group
    (300, 8, 64, False),  # 64 groups: the last bit of the written-rows mask
    (300, 8, 70, False),  # more groups than the mask has bits: zero-filled partials, summed whole
])
def test_forward_and_backward_match_reference(dtype, n, d, groups, sorted_groups):
    inputs = _case(n, d, groups, dtype, seed=n + d, sorted_groups=sorted_groups)
    got = _run("triton", *inputs)
    want = _expected(*inputs)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: rounding of the output / dx
    for name, g, w in zip(("y", "dx", "dweight", "dbias"), got, want):
        scale = w.abs().max().clamp(min=1).item()
        torch.testing.assert_close(g.to(GRAD_DTYPE), w, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("d", [24, 30])  # the backward's 4-element layout (d a multiple of 4) and the 8-element one
def test_fused_gate_matches_reference(dtype, with_bias, d):
    """``GLN(x) * gate`` (HSTU's GLN(O) * U) in one kernel: output and gradients of x, weight, bias, gate."""
    x, group, weight, bias, dy = _case(37, d, 3, dtype, seed=7)
    gate = torch.randn(x.shape, generator=torch.Generator().manual_seed(8)).to(dtype).to(DEVICE)
    bias = bias if with_bias else None
    got = _run("triton", x, group, weight, bias, dy, gate)
    want = _expected(x, group, weight, bias, dy, gate)
    assert len(got) == (5 if with_bias else 4) and got[-1].dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for g, w in zip(got, want):
        scale = w.abs().max().clamp(min=1).item()
        torch.testing.assert_close(g.to(GRAD_DTYPE), w, rtol=tol, atol=tol * scale)
    plain = _run("triton", x, group, weight, bias, dy)[0].float()
    torch.testing.assert_close(got[0].float(), plain * gate.float(), rtol=tol, atol=tol * 8)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_out_dtype_and_strided_gate(impl):
    """float32 ``x`` written as bf16 (``out_dtype``, as a layer under autocast asks for), gated by a column
    slice of a wider bf16 tensor (U of the stacked projection), read in place: the result is the float32
    computation rounded once (within one bf16 step), and the gradients match the reference."""
    x, group, weight, bias, _ = _case(37, 24, 3, torch.float32, seed=9)
    wide = torch.randn(37, 3 * 24, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16).to(DEVICE)
    gate = wide[:, 24:48]
    assert not gate.is_contiguous()
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, wide)]
    y = group_layer_norm(leaves[0], group, leaves[1], leaves[2], impl=impl, gate=leaves[3][:, 24:48],
                         out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16).to(DEVICE)
    grads = torch.autograd.grad(y, leaves, dy)
    assert grads[0].dtype == torch.float32 and grads[3].dtype == torch.bfloat16
    assert torch.all(grads[3][:, :24] == 0) and torch.all(grads[3][:, 48:] == 0)
    want = _expected(x, group, weight, bias, dy, gate)
    plain = _run(impl, x, group, weight, bias, dy, gate.float())[0]
    torch.testing.assert_close(y.float(), plain, rtol=2**-7, atol=1e-6)
    for g, w in zip((y, *grads[:3], grads[3][:, 24:48]), want):
        scale = w.abs().max().clamp(min=1).item()
        torch.testing.assert_close(g.to(GRAD_DTYPE), w, rtol=3e-2, atol=3e-2 * scale)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("use", ["both", "norm only", "x only"])
def test_pass_through_sums_the_residual_gradient(impl, use):
    """``pass_through=True`` returns ``(GLN(x), x)``: ``x`` used on a residual path gets its gradient summed with
    the norm's by the backward kernel, the same as autograd summing the two (and ``x`` is the input's values)."""
    x, group, weight, bias, dy = _case(45, 24, 3, torch.float32, seed=21)
    dres = torch.randn(x.shape, generator=torch.Generator().manual_seed(22)).to(DEVICE)

    def run(fused):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
        if fused:
            y, x_res = group_layer_norm(leaves[0], group, leaves[1], leaves[2], impl=impl, pass_through=True)
            assert torch.equal(x_res, x)
        else:
            y, x_res = group_layer_norm(leaves[0], group, leaves[1], leaves[2], impl=impl), leaves[0]
        loss = {"both": (y * dy).sum() + (x_res * dres).sum(), "norm only": (y * dy).sum(),
                "x only": (x_res * dres).sum()}[use]
        return torch.autograd.grad(loss, leaves, allow_unused=True)

    for got, want in zip(run(True), run(False)):
        if want is None:
            assert got is None or torch.all(got == 0)
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("use", ["both", "norm only", "sum only"])
def test_add_normalises_the_sum(impl, dtypes, use):
    """``add=r`` normalises ``s = x + r`` (summed as torch sums it, in the promoted dtype) and, with ``pass_through``,
    returns ``s``; the gradients of ``x`` and ``r`` are the sum's, in their own dtypes: the same as autograd through
    ``x + r`` and a plain norm (a residual stream and a layer's branch, summed by the next layer's input norm)."""
    x, group, weight, bias, dy = _case(45, 24, 3, dtypes[0], seed=31)
    r = (torch.randn(x.shape, generator=torch.Generator().manual_seed(32)) * 3).to(DEVICE, dtypes[1])
    dres = torch.randn(x.shape, generator=torch.Generator().manual_seed(33)).to(DEVICE)

    def run(fused):
        leaves = [t.detach().clone().requires_grad_() for t in (x, r, weight, bias)]
        if fused:
            y, s = group_layer_norm(leaves[0], group, leaves[2], leaves[3], impl=impl, pass_through=True,
                                    add=leaves[1])
        else:
            s = leaves[0] + leaves[1]
            y = group_layer_norm(s, group, leaves[2], leaves[3], impl=impl)
        loss = {"both": (y.float() * dy.float()).sum() + (s.float() * dres).sum(), "norm only": (y.float() * dy.float()).sum(),
                "sum only": (s.float() * dres).sum()}[use]
        return (y, s, *torch.autograd.grad(loss, leaves, allow_unused=True))

    got, want = run(True), run(False)
    assert got[0].dtype == want[0].dtype and got[1].dtype == want[1].dtype
    # the sum, rounded as torch rounds it (the interpreter's casts to bf16 may differ from round-to-nearest by an ulp)
    torch.testing.assert_close(got[1], want[1], rtol=0 if got[1].dtype == torch.float32 else 2**-7, atol=0)
    assert got[2].dtype == dtypes[0] and got[3].dtype == dtypes[1]
    tol = 1e-5 if dtypes == (torch.float32, torch.float32) else 2e-2
    for g, w in zip(got, want):
        if w is None:
            assert g is None or torch.all(g == 0)
        else:
            torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol)


def test_bad_out_dtype_is_named():
    x, group, weight, bias, _ = _case(4, 8, 2, torch.float32, seed=1)
    with pytest.raises(RecfmError, match="out_dtype"):
        group_layer_norm(x, group, weight, bias, out_dtype=torch.int32)


def test_without_bias_matches_reference():
    x, group, weight, _, dy = _case(41, 20, 3, torch.float32, seed=3)
    got = _run("triton", x, group, weight, None, dy)
    want = _expected(x, group, weight, None, dy)
    assert len(got) == 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g.to(GRAD_DTYPE), w, rtol=1e-5, atol=1e-5)


def test_partials_left_unwritten_are_never_read(monkeypatch):
    """The backward's work buffers start uninitialised (NaN here): a program reads back only the partial rows it
    wrote, and the sum only the rows some program wrote."""
    from recfm.kernels.group_layer_norm import triton_impl

    def scratch(shape, zeroed, device):
        return torch.zeros(shape, device=device) if zeroed else torch.full(shape, float("nan"), device=device)

    monkeypatch.setattr(triton_impl, "_scratch", scratch)
    for n, groups, sorted_groups in ((200, 6, True), (90, 64, False), (50, 3, False)):
        inputs = _case(n, 16, groups, torch.float32, seed=n, sorted_groups=sorted_groups)
        got = _run("triton", *inputs)
        want = _expected(*inputs)
        for g, w in zip(got, want):
            assert not g.isnan().any()
            torch.testing.assert_close(g.to(GRAD_DTYPE), w, rtol=1e-5, atol=1e-5)


def test_group_gradients_are_per_group_sums():
    """A group with no rows gets zero weight/bias gradients; the others sum exactly their own rows."""
    x, group, weight, bias, dy = _case(29, 12, 4, torch.float32, seed=5)
    group = torch.where(group == 2, torch.zeros_like(group), group)  # group 2 is absent
    _, _, dw, db = _run("triton", x, group, weight, bias, dy)
    assert torch.all(dw[2] == 0) and torch.all(db[2] == 0)
    for g in (0, 1, 3):
        torch.testing.assert_close(db[g], dy[group == g].sum(0), rtol=1e-5, atol=1e-5)


def test_empty_input():
    x, group, weight, bias, dy = _case(0, 24, 3, torch.bfloat16, seed=1)
    y, dx, dw, db = _run("triton", x, group, weight, bias, dy)
    assert y.shape == (0, 24) and dx.shape == (0, 24)
    assert torch.all(dw == 0) and torch.all(db == 0) and dw.shape == (3, 24)


def test_registered_lazily():
    assert set(IMPLS) >= {"reference", "triton"}
    assert IMPLS["triton"].__module__ == "recfm.kernels.group_layer_norm"  # the module imports triton on call
