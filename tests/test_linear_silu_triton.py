"""The HSTU projection with its fused Triton backward against the PyTorch reference.

Runs on CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set in conftest before Triton is imported)
and on CUDA when one is present. Skipped when Triton is not installed.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install recfm[kernels])", allow_module_level=True)

from recfm.errors import RecfmError  # noqa: E402
from recfm.kernels.linear_silu import IMPLS, linear_silu  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(n, d_in, outs, seed, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen)
    weights = [torch.randn(o, d_in, generator=gen) / d_in**0.5 for o in outs]
    biases = [torch.randn(o, generator=gen) if bias else None for o in outs]
    return x, weights, biases


def _run(impl, x, weights, biases, sizes, silu, dtype, autocast=False, used=None):
    """Outputs and the gradients of x, weights, biases for a loss on the ``used`` parts (default all)."""
    leaves = [t.detach().to(DEVICE, dtype).requires_grad_() for t in (x, *weights, *[b for b in biases if b is not None])]
    ws = leaves[1:1 + len(weights)]
    bs = leaves[1 + len(weights):] or [None] * len(weights)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        outs = linear_silu(leaves[0], ws, bs, sizes, silu, impl=impl)
    used = range(len(outs)) if used is None else used
    gen = torch.Generator().manual_seed(99)
    loss = sum((outs[i].double() * torch.randn(outs[i].shape, generator=gen, dtype=torch.float64).to(DEVICE)).sum()
               for i in used)
    grads = torch.autograd.grad(loss, leaves)
    return outs, grads


@pytest.mark.parametrize("n, outs, sizes, silu", [
    (200, [40, 24], [16, 24, 24], [True, False, True]),  # parts across the weights' row blocks, mixed SiLU
    (37, [48], [24, 24], [True, True]),                    # one weight, rows not a multiple of the row block
    (5, [12, 20], [12, 20], [False, False]),               # no SiLU: dpre is dy, db its column sums
    (90, [20], [20], [False]),                             # one part, no SiLU (W_out): dy itself is dpre
    (1, [8], [8], [True]),                                 # one row
    (0, [16, 16], [16, 16], [True, True]),                 # no rows
])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference_fp32(n, outs, sizes, silu, bias):
    x, weights, biases = _case(n, 24, outs, seed=n + len(sizes), bias=bias)
    got_out, got = _run("triton", x, weights, biases, sizes, silu, torch.float32)
    want_out, want = _run("reference", x, weights, biases, sizes, silu, torch.float64)
    assert [o.shape for o in got_out] == [(n, s) for s in sizes]
    for g, w in zip((*got_out, *got), (*want_out, *want)):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n, d_in, sizes, silu, dtype", [
    (300, 80, [72, 64, 64], [True, True, True], torch.float32),    # rows and K past a tile, 200 columns: one tile
    (150, 24, [40, 24], [True, False], torch.float32),              # mixed SiLU: per-column flags
    (129, 32, [96, 160, 64], [False, True, True], torch.bfloat16),  # two column tiles, the second partial
    (7, 16, [32], [True], torch.float16),
])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_forward_matches_reference(monkeypatch, n, d_in, sizes, silu, dtype, bias):
    """The forward's matmul with the SiLU in its epilogue (``_mm_silu``): both the saved pre-activation (through
    the backward's gradients) and the outputs match the reference; 16-bit within their rounding."""
    from recfm.kernels.linear_silu import triton_impl

    calls = []
    original = triton_impl._mm_silu_forward
    monkeypatch.setattr(triton_impl, "_mm_silu_forward", lambda *a: calls.append(a[0].dtype) or original(*a))
    outs = [sum(sizes[:2]), *sizes[2:]] if len(sizes) > 2 else [sum(sizes)]
    x, weights, biases = _case(n, d_in, outs, seed=n + d_in, bias=bias)
    got_out, got = _run("triton", x, weights, biases, sizes, silu, dtype)
    want_out, want = _run("reference", x, weights, biases, sizes, silu, torch.float64)
    if DEVICE == "cpu" or dtype != torch.float32:  # CUDA's float32 forward stays with cuBLAS
        assert calls == [dtype]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for g, w in zip((*got_out, *got), (*want_out, *want)):
        assert g.dtype == dtype
        scale = w.abs().max().clamp(min=1).item()
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol * scale)


def test_fused_forward_needs_aligned_rows(monkeypatch):
    """A row of x not a multiple of 16 bytes (TMA's alignment) takes cuBLAS's addmm and F.silu instead."""
    from recfm.kernels.linear_silu import triton_impl

    monkeypatch.setattr(triton_impl, "_mm_silu_forward", None)  # would fail if called
    x, weights, biases = _case(9, 20, [32], seed=4)
    assert not triton_impl._fused_forward(x.to(DEVICE, torch.float16), weights[0].to(DEVICE, torch.float16))
    got_out, got = _run("triton", x, weights, biases, [32], [True], torch.float16)
    want_out, want = _run("reference", x, weights, biases, [32], [True], torch.float64)
    for g, w in zip((*got_out, *got), (*want_out, *want)):
        torch.testing.assert_close(g.double(), w, rtol=2e-2, atol=2e-2 * w.abs().max().clamp(min=1).item())


def test_unused_part_gets_no_gradient():
    """A part left out of the loss contributes nothing: its weight rows and bias get zero gradients."""
    x, weights, biases = _case(50, 16, [32], seed=3)
    _, got = _run("triton", x, weights, biases, [16, 16], [True, True], torch.float32, used=[0])
    _, want = _run("reference", x, weights, biases, [16, 16], [True, True], torch.float64, used=[0])
    assert torch.all(got[1][16:] == 0) and torch.all(got[2][16:] == 0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


def test_output_projection_reads_its_gradient_as_it_is(monkeypatch):
    """One part without SiLU (HSTU's W_out): the backward's matmuls take the incoming gradient itself, no copy of it
    is made, and the kernel only sums its columns (bias gradient)."""
    from recfm.kernels.linear_silu import triton_impl

    x, weights, biases = _case(70, 16, [24], seed=11)
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, *weights, *biases)]
    (y,) = linear_silu(leaves[0], leaves[1:2], leaves[2:], [24], [False], impl="triton")
    dy = torch.randn(70, 24, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    seen = []
    launch = triton_impl._silu_grad

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kw):
                seen.append((args[0].data_ptr(), args[2].data_ptr(), kw["STORE"]))
                return launch[grid](*args, **kw)
            return run

    monkeypatch.setattr(triton_impl, "_silu_grad", Spy())
    y.backward(dy)
    assert seen == [(dy.data_ptr(), dy.data_ptr(), False)]
    torch.testing.assert_close(leaves[0].grad, dy @ leaves[1].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaves[1].grad, dy.t() @ leaves[0].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaves[2].grad, dy.sum(0), rtol=1e-5, atol=1e-5)


def test_autocast_bf16_matches_reference():
    """Under bf16 autocast: bf16 outputs (as nn.Linear), gradients in the leaves' dtypes, within bf16 rounding
    of the reference under the same autocast."""
    x, weights, biases = _case(70, 32, [48, 16], seed=5)
    sizes, silu = [16, 32, 16], [True, True, False]
    got_out, got = _run("triton", x, weights, biases, sizes, silu, torch.float32, autocast=True)
    want_out, want = _run("reference", x, weights, biases, sizes, silu, torch.float32, autocast=True)
    assert all(o.dtype == torch.bfloat16 for o in got_out) and all(g.dtype == torch.float32 for g in got)
    for g, w in zip((*got_out, *got), (*want_out, *want)):
        scale = w.abs().max().clamp(min=1).item()
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2 * scale)


def test_bf16_input_under_autocast_reads_it_as_is():
    """A bf16 input (a Group LayerNorm that wrote the autocast dtype) gets a bf16 gradient, no cast pass."""
    x, weights, biases = _case(33, 16, [32], seed=7)
    leaves = [x.to(DEVICE, torch.bfloat16).requires_grad_(), *(t.to(DEVICE).requires_grad_() for t in (*weights, *biases))]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        u, q = linear_silu(leaves[0], leaves[1:2], leaves[2:], [16, 16], [True, True], impl="triton")
    (u.float().sum() + q.float().pow(2).sum()).backward()
    assert leaves[0].grad.dtype == torch.bfloat16 and leaves[1].grad.dtype == torch.float32


@pytest.mark.parametrize("call, words", [
    (lambda x, w, b: linear_silu(x, [w], [b], [16], [True], impl="nope"), "impl"),
    (lambda x, w, b: linear_silu(x[0], [w], [b], [16], [True]), "x must be"),
    (lambda x, w, b: linear_silu(x, [w[:, :3]], [b], [16], [True]), "weights[0]"),
    (lambda x, w, b: linear_silu(x, [w], [b[:4]], [16], [True]), "biases[0]"),
    (lambda x, w, b: linear_silu(x, [w, w], [b, None], [32], [True]), "all tensors or all None"),
    (lambda x, w, b: linear_silu(x, [w], [b], [8, 4], [True, True]), "sizes"),
    (lambda x, w, b: linear_silu(x, [w], [b], [8, 8], [True]), "sizes"),
])
def test_bad_input_is_named(call, words):
    x, (w,), (b,) = _case(4, 8, [16], seed=1)
    with pytest.raises(RecfmError, match=words.replace("[", r"\[").replace("]", r"\]")):
        call(x, w, b)


def test_registered_lazily():
    assert set(IMPLS) >= {"reference", "triton"}
    assert IMPLS["triton"].__module__ == "recfm.kernels.linear_silu"  # the module imports triton on call
