"""What the HSTU attention kernels compile to on an H100, without one: registers, spills, shared memory and
which loads Triton's software pipeliner made asynchronous.

    python -m bench.kernel_report                                   (the medium step's attention, pinned)
    python -m bench.kernel_report --variant medium-nobias --pins step-plain --json out.json

One forward + backward of :func:`recfm.kernels.hstu_attention.hstu_attention` on CPU tensors is run with every
Triton launch turned into a compile for ``sm_90`` (a stand-in driver names the target; nothing is launched,
the outputs are left unwritten). For each compiled kernel the report reads Triton's pipelined IR and runs the
``ptxas`` that ships with Triton on its PTX:

* ``regs``, ``spill_stores`` / ``spill_loads`` (bytes), ``smem`` (bytes);
* ``async``: tensor loads copied to shared memory ahead of their use (``cp.async``), by shape;
* ``prefetched``: loads issued one loop iteration ahead into registers (or before the loop that uses them);
* ``waiting``: tensor loads inside a loop that neither, i.e. the warp waits on memory there each iteration
  (2-D ones in a kernel's key loop are what the bias cache's tile was before it was masked by rows only).

Block sizes: ``--pins step`` / ``step-plain`` are ``bench.attention_profile``'s ``STEP`` / ``STEP_PLAIN`` (the
medium step's autotuned picks), ``step-ds`` / ``step-13`` those of the dS buffer (run 10) and of the score cache with
dK and dV as two launches (run 13, named ``hstu_dkdv_kernel[dK]`` / ``[dV]``); ``first`` runs each kernel's first
config. Needs Triton's CUDA backend (its
``ptxas``), not a GPU, and must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


@contextlib.contextmanager
def compile_only(target_arch: int = 90):
    """Inside the block, launching a ``@triton.jit`` kernel compiles it for ``cuda:target_arch`` and records
    ``(name, compiled kernel, num_warps)`` in the yielded list instead of running it."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from recfm.kernels.hstu_attention import triton_impl

    class Target:
        def get_current_target(self):
            return GPUTarget("cuda", target_arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise RuntimeError("bench.kernel_report: nothing is timed here (pin the block sizes)")

    compiled = []
    run, check = JITFunction.run, triton_impl.check_triton_inputs
    previous = driver._active  # None on a machine without a GPU driver (reset_active() would then raise)

    def compile_run(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        if not warmup:  # the dK/dV kernel's dK-only and dV-only launches (PART 1, 2) are named apart
            name = self.fn.__name__ + {1: "[dK]", 2: "[dV]"}.get(kwargs.get("PART", 0), "")
            compiled.append((name, kernel, kwargs.get("num_warps")))
        return kernel

    driver.set_active(Target())
    JITFunction.run = compile_run
    triton_impl.check_triton_inputs = lambda q, d_v: None  # CPU tensors stand in for CUDA ones
    try:
        yield compiled
    finally:
        JITFunction.run = run
        triton_impl.check_triton_inputs = check
        driver._active = previous


def ptxas_path() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def _loop_bodies(lines: list[str]) -> list[range]:
    """Line ranges of the bodies of every ``scf.for`` (MLIR indents regions)."""
    bodies = []
    for i, line in enumerate(lines):
        if "scf.for" in line:
            indent = len(line) - len(line.lstrip())
            end = i + 1
            while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
                end += 1
            bodies.append(range(i + 1, end))
    return bodies


def loads(ttgir: str) -> dict:
    """Tensor loads by kind: ``async`` (anywhere), and ``prefetched`` / ``waiting`` in the loops that run a
    matmul themselves (the key loops; a nested loop's lines count for the nested loop only) -> shapes."""
    lines = ttgir.splitlines()
    found = {"async": [], "prefetched": [], "waiting": []}
    for line in lines:
        copy = re.search(r"async_copy_global_to_local .*: tensor<([\dx]+)x!tt\.ptr<(\w+)>", line)
        if copy:
            found["async"].append(f"{copy.group(1)} {copy.group(2)}")
    bodies = _loop_bodies(lines)
    for body in bodies:
        nested = {j for other in bodies if other is not body and other.start in body for j in range(other.start - 1,
                                                                                                     other.stop)}
        own = [j for j in body if j not in nested]
        if not any("warp_group_dot" in lines[j] or "tt.dot " in lines[j] for j in own):
            continue
        # carried: yielded to the next iteration, or the first iteration's value of a nested pipelined loop
        yields = " ".join(lines[j] for j in body if lines[j].strip().startswith("scf.yield") and j in own
                          or "iter_args(" in lines[j])
        for j in own:
            load = re.search(r"(%[\w#]+) = tt\.load [^:]*: tensor<([\dx]+)x!tt\.ptr<(\w+)>", lines[j])
            if load:
                carried = re.search(re.escape(load.group(1)) + r"\b", yields) is not None
                found["prefetched" if carried else "waiting"].append(f"{load.group(2)} {load.group(3)}")
    return {kind: sorted(set(shapes)) for kind, shapes in found.items()}


def describe(name: str, kernel, num_warps) -> dict:
    """One kernel's row of the report."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        out = subprocess.run([ptxas_path(), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return dict(kernel=name, num_warps=num_warps, regs=int(regs.group(1)) if regs else None,
                spill_stores=int(spill.group(1)) if spill else None, spill_loads=int(spill.group(2)) if spill else None,
                smem=kernel.metadata.shared, **loads(kernel.asm["ttgir"]))


def report(variant: str, length: int, samples: int, pins: str, extra: dict | None = None) -> list[dict]:
    """Compile one forward + backward of ``bench.attention_sweep`` variant ``variant`` (``samples`` samples of
    ``length`` tokens, bf16) and describe each kernel; ``extra``: ``{kind: (BLOCK_M, BLOCK_N, warps, stages)}``
    over the pins (not with ``first``)."""
    import torch

    from bench.attention import make_batch
    from bench.attention_profile import STEP, STEP_13, STEP_DS, STEP_PLAIN, known
    from bench.attention_sweep import VARIANTS
    from recfm.kernels.hstu_attention import hstu_attention
    from recfm.kernels.hstu_attention.triton_launch import pinned, untuned

    h, h_kv, d, mask, tables = VARIANTS[variant]
    batch = make_batch(length, samples, h, h_kv, d, mask, "cpu", torch.bfloat16)
    kw = dict(batch["kw"])
    for name in ("pos", "time"):
        if name not in tables.split(","):
            kw.pop(f"{name}_bias", None)
    leaves = {name: kw.pop(name).detach().requires_grad_() for name in ("pos_bias", "time_bias") if name in kw}
    q, k, v = (batch[name].detach().clone().requires_grad_() for name in ("q", "k", "v"))
    sets = {"step": STEP, "step-ds": STEP_DS, "step-plain": STEP_PLAIN, "step-13": STEP_13}
    blocks = pinned(**known({**sets[pins], **(extra or {})})) if pins in sets else untuned()
    with compile_only() as compiled, blocks:
        out = hstu_attention(q, k, v, batch["offsets"], impl="triton", validate=False, **kw, **leaves)
        out.backward(torch.zeros_like(out))
    return [describe(name, kernel, warps) for name, kernel, warps in compiled]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="medium", help="a bench.attention_sweep variant (default: medium)")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--pins", choices=("step", "step-ds", "step-13", "step-plain", "first"), default="step")
    parser.add_argument("--pin", action="append", default=[], metavar="KIND=BM,BN,WARPS,STAGES[,MAXNREG]",
                        help="override one kernel's pinned block sizes (and register cap), e.g. --pin dq=64,64,8,2 "
                             "(repeatable)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench.kernel_report: unset TRITON_INTERPRET (the interpreter compiles nothing)", file=sys.stderr)
        return 2
    try:
        extra = {kind: tuple(int(x) for x in cfg.split(",")) for kind, cfg in (p.split("=") for p in args.pin)}
    except ValueError:
        parser.error(f"--pin: expected KIND=BM,BN,WARPS,STAGES[,MAXNREG], got {args.pin}")
    if any(len(cfg) not in (4, 5) for cfg in extra.values()):
        parser.error(f"--pin: expected four or five numbers per kernel, got {args.pin}")
    rows = report(args.variant, args.length, args.samples, args.pins, extra)
    print(f"{'kernel':24s} {'warps':>5s} {'regs':>5s} {'spill st/ld':>12s} {'smem KB':>8s}  waiting loads in loops")
    for r in rows:
        spill = f"{r['spill_stores']}/{r['spill_loads']}"
        print(f"{r['kernel']:24s} {r['num_warps'] or '':>5} {r['regs']:>5} {spill:>12s} {r['smem'] / 1024:8.1f}  "
              f"{', '.join(r['waiting']) or '-'}")
    if args.json:
        args.json.write_text(json.dumps(dict(variant=args.variant, length=args.length, samples=args.samples,
                                             pins=args.pins, extra_pins=extra, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
