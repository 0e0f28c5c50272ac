"""Launchers of the HSTU attention kernels: block sizes (fixed under the interpreter, autotuned on a GPU).

Batches with ``max_len < TUNE_FROM_LEN`` use one fixed config per kernel. Autotuning keys on the head dims, mask mode, flags, dtypes and ``LEN_KEY`` (``max_len`` rounded up to a
power of two), so one GPU run picks a config per shape class. The dQ kernel's bias-gradient buffers are
reset between trials (``reset_to_zero``) because it accumulates into them with atomics.
"""

from __future__ import annotations

import functools
import os

import triton

from recfm.kernels.hstu_attention.triton_bwd import hstu_dkdv_kernel, hstu_dq_kernel
from recfm.kernels.hstu_attention.triton_fwd import hstu_fwd_kernel

INTERPRET_BLOCK = 16  # tiny tiles under TRITON_INTERPRET=1 (tests)
TUNE_FROM_LEN = 512  # shorter batches run one fixed config (tuning them is not worth the compile time)
KEY = ["LEN_KEY", "D_QK", "D_V", "H", "GROUP", "MASK_MODE", "NORM", "HAS_QIDX", "HAS_POS", "HAS_TIME"]


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _interpreter_index_fix() -> None:
    """Triton 3.6's interpreter turns a scalar (a 1-element array there) into a loop bound with
    ``int(array)``, which numpy >= 2.4 refuses for 1-d arrays; wrap its tensor patch so ``__index__`` reads
    the single element. Applied once, only under ``TRITON_INTERPRET=1``."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def fwd_configs(block_d: int) -> list[triton.Config]:
    """Forward / dQ tiles for Hopper: query tile x key tile, warps, pipeline stages."""
    if block_d <= 64:
        return [_config(128, 64, 4, 3), _config(128, 128, 8, 3), _config(64, 64, 4, 3), _config(128, 32, 4, 4)]
    if block_d <= 128:
        return [_config(128, 64, 8, 3), _config(128, 128, 8, 2), _config(128, 64, 4, 3), _config(64, 64, 4, 3),
                _config(128, 32, 4, 3)]
    return [_config(128, 64, 8, 2), _config(64, 64, 4, 2), _config(128, 32, 8, 2), _config(64, 32, 4, 2)]


def dkdv_configs(block_d: int) -> list[triton.Config]:
    """dK/dV tiles: BLOCK_N keys held in registers, BLOCK_M query rows streamed."""
    if block_d <= 64:
        return [_config(64, 128, 8, 3), _config(64, 64, 4, 3), _config(32, 128, 4, 3), _config(32, 64, 4, 4)]
    if block_d <= 128:
        return [_config(64, 128, 8, 2), _config(32, 128, 8, 3), _config(64, 64, 4, 3), _config(32, 64, 4, 3)]
    return [_config(32, 64, 4, 2), _config(64, 64, 8, 2), _config(32, 128, 8, 2), _config(16, 64, 4, 2)]


@functools.lru_cache(maxsize=None)
def _tuned(kind: str, block_d: int):
    if kind == "fwd":
        return triton.autotune(fwd_configs(block_d), key=KEY)(hstu_fwd_kernel)
    if kind == "dq":
        return triton.autotune(fwd_configs(block_d), key=KEY, reset_to_zero=["DPTAB", "DTTAB"])(hstu_dq_kernel)
    return triton.autotune(dkdv_configs(block_d), key=KEY)(hstu_dkdv_kernel)


_KERNELS = {"fwd": hstu_fwd_kernel, "dq": hstu_dq_kernel, "dkdv": hstu_dkdv_kernel}


def launch(kind: str, grid_rows: int, num_samples: int, num_heads: int, args: tuple, meta: dict) -> None:
    """Run kernel ``kind`` (``fwd`` | ``dq`` | ``dkdv``) over ``(cdiv(grid_rows, tile), num_samples,
    num_heads)`` programs; the tile is BLOCK_M (fwd, dq) or BLOCK_N (dkdv)."""
    block = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
    if interpreting():
        _interpreter_index_fix()
        tiles = {"BLOCK_M": INTERPRET_BLOCK, "BLOCK_N": INTERPRET_BLOCK}
        grid = (max(1, triton.cdiv(grid_rows, tiles[block])), num_samples, num_heads)
        _KERNELS[kind][grid](*args, **meta, **tiles)
        return
    block_d = max(meta["BLOCK_DQK"], meta["BLOCK_DV"])
    if grid_rows < TUNE_FROM_LEN:
        cfg = (dkdv_configs if kind == "dkdv" else fwd_configs)(block_d)[-1]
        grid = (max(1, triton.cdiv(grid_rows, cfg.kwargs[block])), num_samples, num_heads)
        _KERNELS[kind][grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return

    def tuned_grid(cfg):
        return (max(1, triton.cdiv(grid_rows, cfg[block])), num_samples, num_heads)

    _tuned(kind, block_d)[tuned_grid](*args, **meta)
