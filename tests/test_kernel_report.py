"""bench/kernel_report.py: the step's attention kernels compiled for sm_90 on this machine (no GPU needed).

The property checked is one a CPU test cannot see otherwise: the bias cache's tile, read once per key block,
is loaded ahead of its use (an asynchronous copy or a register prefetch of Triton's pipeliner), not waited on
in every iteration, as it was while its mask varied along the contiguous columns (docs/benchmarks.md, run 9);
likewise the dS buffer's tile in the dK launch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")
ROOT = Path(__file__).resolve().parents[1]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton has no CUDA backend (ptxas) to compile for sm_90")
def test_bias_cache_tile_is_loaded_ahead(tmp_path):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-m", "bench.kernel_report", "--variant", "medium", "--length", "256",
                           "--samples", "2", "--pins", "step-13", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["kernel"]: r for r in json.loads(out.read_text())["rows"]}
    # the table gradients come from the dS the dQ kernel stores (triton_impl.DS_BUFFER), the position table's
    # near-diagonal pairs along its diagonals (DIAG_GRADS); with the score cache dK and dV are two launches
    assert set(rows) == {"hstu_bias_kernel", "hstu_fwd_kernel", "hstu_dq_kernel", "hstu_ds_grad_kernel",
                         "hstu_diag_grad_kernel", "hstu_dkdv_kernel[dK]", "hstu_dkdv_kernel[dV]"}
    from bench.attention_profile import STEP_13

    # the kernels' [BLOCK_M, BLOCK_N] tile of the cache (the bias, then the scores; dK: of the dS buffer, laid out
    # alike) at the step's pinned block sizes
    for kernel, (block_m, block_n, *_) in (("hstu_fwd_kernel", STEP_13["fwd"]), ("hstu_dq_kernel", STEP_13["dq"]),
                                           ("hstu_dkdv_kernel[dK]", STEP_13["dk"]),
                                           ("hstu_dkdv_kernel[dV]", STEP_13["dv"])):
        row = rows[kernel]
        tiles = {f"{block_m}x{block_n} bf16", f"{block_n}x{block_m} bf16"}
        assert not tiles & set(row["waiting"]), (kernel, row["waiting"])
        assert tiles & set(row["async"] + row["prefetched"]), (kernel, row["async"], row["prefetched"])
        assert row["regs"] is not None and row["regs"] <= 255
