"""Launchers of the HSTU attention kernels: block sizes (fixed under the interpreter, autotuned on a GPU).

Batches with ``max_len < TUNE_FROM_LEN`` use one fixed config per kernel. Otherwise autotuning keys on
``LEN_KEY`` (``max_len`` rounded up to a power of two), head dims, heads, group, mask mode, flags and
dtypes, so one GPU run picks a config per shape class. What a kernel changes in place is restored after each
trial (``restore_value``): the dQ, band and table-gradient kernels' bias-gradient buffers, which they add to with
atomics on top of the sums of the kernels launched before them, and the forward's bias cache, which it overwrites
with its scores.

From ``SPLIT_FROM_LEN`` on, the table gradients are split between the dQ kernel (flat ``SUPER x SUPER``
cells, in registers, large tiles) and the band kernel (the other cells, small tiles): both judge flatness on
the same ``SUPER``-aligned grid, which every block size of both divides. Shorter batches, where most tiles
lie near the diagonal, take them from the dS the dQ kernel stores (``dsgrad``, with the bias cache:
:data:`.triton_impl.DS_BUFFER`; the position table's unclamped pairs of keys at their own event positions go to
``diag`` along the buffer's diagonals, :data:`.triton_impl.DIAG_GRADS`), else compute all of them in one dQ pass
(``dq_inline``, small tiles).
"""

from __future__ import annotations

import contextlib
import functools

import triton
import triton.testing

from recfm.kernels.hstu_attention.triton_bwd import (hstu_band_grad_kernel, hstu_diag_grad_kernel, hstu_dkdv_kernel,
                                                      hstu_dq_kernel, hstu_ds_grad_kernel)
from recfm.kernels.hstu_attention.triton_fwd import hstu_fwd_kernel
from recfm.kernels.interpreter import index_fix as _interpreter_index_fix  # noqa: F401 - tests import it here
from recfm.kernels.interpreter import interpreting

INTERPRET_BLOCK = 16  # tiny tiles under TRITON_INTERPRET=1 (tests)
INTERPRET_SUPER = 16  # the table-gradient grid under the interpreter (tests also run 32: 2 x 2 tiles each)
SUPER = 128  # the table-gradient grid on a GPU: at least every BLOCK_M / BLOCK_N below
SPLIT_FROM_LEN = 2048  # from this max_len on, table gradients split between dq and band (else dq_inline)
TUNE_FROM_LEN = 512  # shorter batches run one fixed config (tuning them is not worth the compile time)
TILES_FIRST = True  # grid (tiles, heads, samples) up to MAX_GRID_Z samples (triton_common.grid_ids)
MAX_GRID_Z = 65535
KEY = ["LEN_KEY", "D_QK", "D_V", "H", "GROUP", "MASK_MODE", "NORM", "HAS_QIDX", "HAS_POS", "HAS_TIME", "POS_GRAD",
       "TIME_GRAD", "TB_LANES", "TOEP", "BIAS_IN", "SCORES", "PART", "DS_OUT", "DS_IN", "DIAG", "P_SLOTS"]


def _config(block_m: int, block_n: int, warps: int, stages: int, maxnreg: int | None = None) -> triton.Config:
    """``maxnreg``: a cap on registers per thread (more programs resident per SM, at the risk of spills)."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages,
                         maxnreg=maxnreg)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, head-dim class and "heavy" (a bias table on: more
# live registers per score). The first of each list is the best of bench/attention_sweep.py on an H100 at
# B=16, L=4096, 4 x 128 (d 128: causal without tables, mixed with both tables) and 3 x 256 (d 256, mixed),
# bf16 (docs/benchmarks.md); d 256 without tables (dq, dkdv): the fastest of a pinned profile of 2 x 256 causal
# at L 4096. The others are what the autotuner also tries (batches from TUNE_FROM_LEN on).
# Shorter batches run the last one. Each compiles for sm_90 within shared memory (16-bit bias tables).
_CONFIGS = {
    ("fwd", 64, False): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
    ("fwd", 128, False): [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)],
    ("fwd", 256, False): [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 2), (64, 32, 4, 3)],
    ("dq", 64, False): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
    ("dq", 128, False): [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    ("dq", 256, False): [(128, 32, 8, 3), (64, 64, 8, 2), (64, 32, 4, 3)],
    ("dkdv", 64, False): [(32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3)],
    ("dkdv", 128, False): [(64, 128, 8, 3), (32, 128, 8, 3), (32, 64, 4, 3)],
    ("dkdv", 256, False): [(64, 64, 8, 2), (32, 64, 8, 3), (32, 64, 8, 2), (16, 32, 4, 2)],
    ("fwd", 64, True): [(128, 64, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2)],
    ("fwd", 128, True): [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 8, 2)],
    ("fwd", 256, True): [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 8, 2)],
    ("dq", 64, True): [(128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)],
    ("dq", 128, True): [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)],
    ("dq", 256, True): [(64, 64, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3)],
    ("dq_inline", 64, True): [(64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2)],
    ("dq_inline", 128, True): [(32, 32, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2)],
    ("dq_inline", 256, True): [(32, 32, 4, 2), (64, 64, 8, 2), (64, 32, 8, 2)],
    ("band", 64, True): [(32, 32, 4, 2), (64, 32, 4, 2), (64, 64, 8, 2)],
    ("band", 128, True): [(32, 32, 4, 2), (64, 32, 4, 2), (64, 64, 8, 2)],
    ("band", 256, True): [(32, 32, 4, 2), (32, 64, 4, 2), (64, 32, 8, 2)],
    # the table gradients from the stored dS (no products: the tile holds only dS and the gradient state); one warp
    # per 16 x 32 tile: 0.90 ms per layer at the medium step's shape against 1.51 for 64 x 32 in 4 warps (H100). The
    # kernel's one-warp programs wait on dependent loads; at 254 registers only 8 fit an SM, capped at 128 (spilling
    # to L1) 16: the autotuner takes the cap in the medium step, 37.5 ms per step as a CUDA graph against 37.9 / 38.0
    # (docs/benchmarks.md, run 15)
    ("dsgrad", 64, True): [(16, 32, 1, 2, 128), (16, 32, 1, 2), (32, 32, 1, 2), (32, 32, 2, 2), (16, 16, 1, 2)],
    ("dsgrad", 128, True): [(16, 32, 1, 2, 128), (16, 32, 1, 2), (32, 32, 1, 2), (32, 32, 2, 2), (16, 16, 1, 2)],
    ("dsgrad", 256, True): [(16, 32, 1, 2, 128), (16, 32, 1, 2), (32, 32, 1, 2), (32, 32, 2, 2), (16, 16, 1, 2)],
    ("dkdv", 64, True): [(32, 128, 8, 2), (32, 64, 8, 2), (16, 64, 4, 2)],
    ("dkdv", 128, True): [(32, 128, 8, 2), (32, 128, 8, 3), (32, 64, 8, 2)],
    ("dkdv", 256, True): [(32, 64, 8, 2), (64, 64, 8, 2), (16, 64, 8, 2)],
    # the forward reading the bias cache (BIAS_IN): in the medium step (d 256) 128 x 32 x 2 stages took 5.96 ms
    # per step against 7.62 for 128 x 64, which the autotuner had picked from the list without tables; since the
    # cache's tile is pipelined, 3 stages: 0.78 against 0.89 ms per layer at the step's shape
    ("fwd", 256, "cache"): [(128, 32, 8, 3), (128, 32, 8, 2), (64, 32, 4, 3), (64, 64, 8, 2)],
    # dQ reading the cache (and storing dS for the table-gradient kernel): the list without tables, but 128 x 32
    # in 2 stages (3 need 256 KB of shared memory with the cache's tile)
    ("dq", 256, "cache"): [(128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 3)],
    # dK/dV reading the stored dS (DS_IN: no V tile, three products): 64 x 32 in 4 warps took 1.33 ms per layer at
    # the medium step's shape against 1.51 for 64 x 64 in 8 warps and 1.55 for 32 x 32 (H100, docs/benchmarks.md)
    ("dkdv", 256, "ds"): [(64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
    # dQ and dK/dV reading the forward's scores (the score cache, SCORES: no Q tile in dQ, no K tile in dK/dV), at the
    # medium step's shape (H100, pinned): dQ 128 x 32 in 3 stages 0.69 ms per layer, 128 x 16 0.77, 128 x 32 in 2
    # stages 0.92, 64 x 32 1.17-1.61; dK/dV 64 x 64 in 8 warps 0.92, 32 x 64 1.11, 64 x 32 in 4 warps 1.13, 32 x 32
    # 1.27 (64 x 64 in 3 stages needs 238 KB of shared memory)
    ("dq", 256, "scores"): [(128, 32, 8, 3), (128, 16, 8, 3), (128, 32, 8, 2), (64, 32, 8, 3)],
    ("dkdv", 256, "scores"): [(64, 64, 8, 2), (32, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
}
# the position-table gradient along the dS buffer's diagonals (no products, no head dim: one list); BLOCK_N is the
# number of offsets per skewed tile. At the medium step's shape (H100): 32 x 32 in one warp 0.25 ms per layer,
# 16 x 64 0.29, 32 x 64 in two warps 0.31, 32 x 64 in one 0.47, 64 x 64 in two 0.76; 16 x 32 also with dsgrad's cap
# of 128 registers (the autotuner kept 16 x 32 uncapped in the medium step, run 15), and in two warps (128 registers
# instead of 212 in one), which the autotuner takes in the medium step (run 16)
_CONFIGS.update({("diag", d, True): [(32, 32, 1, 1), (16, 32, 1, 1, 128), (16, 64, 1, 1), (32, 64, 2, 1),
                                     (16, 32, 2, 1), (32, 32, 2, 1), (16, 32, 1, 1)]
                 for d in (64, 128, 256)})
# dK and dV as two launches (triton_impl.DKDV_SPLIT: the score cache and the dS buffer; one accumulator each):
# (query rows, keys, warps, stages), keys up to 128 wide. At the medium step's shape (H100, d 256, both launches
# pinned alike): 64 x 128 in 8 warps and 3 stages 0.55 ms per layer, in 2 stages 0.78, 64 x 64 in 4 warps 0.79,
# 32 x 128 1.02, 64 x 64 in 8 warps 1.10, against 0.92 for one launch (64 x 64, both accumulators)
_CONFIGS.update({
    ("dk", 64, True): [(64, 128, 8, 3), (64, 64, 4, 3), (32, 128, 4, 3)],
    ("dk", 128, True): [(64, 128, 8, 3), (64, 64, 4, 3), (32, 128, 8, 3)],
    ("dk", 256, True): [(64, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 2), (32, 128, 8, 2)],
    ("dv", 64, True): [(64, 128, 8, 3), (64, 64, 4, 3), (32, 128, 4, 3)],
    ("dv", 128, True): [(64, 128, 8, 3), (64, 64, 4, 3), (32, 128, 8, 3)],
    ("dv", 256, True): [(64, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 2), (32, 128, 8, 2)],
})
DIAG_ROW_TILES = 4  # query tiles per program of the diag kernel (it flushes its register sums once per program)


def _dim_class(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def configs(kind: str, block_d: int, heavy: bool | str) -> list[triton.Config]:
    """Autotuning candidates of kernel ``kind`` for head dims padded to ``block_d``; the last is the fixed
    config of short batches. ``heavy``: a bias table on (True), none (False), ``"cache"``, ``"ds"`` or ``"scores"``
    (:func:`config_class`)."""
    return [_config(*c) for c in _CONFIGS[(kind, _dim_class(block_d), heavy)]]


def config_class(kind: str, block_d: int, meta: dict) -> bool | str:
    """Which list of :data:`_CONFIGS` kernel ``kind`` tunes over: dQ and dK/dV reading the score cache (``SCORES``)
    their own where one was measured (``"scores"``); dK/dV reading the stored dS (``DS_IN``) its own
    where one was measured (``"ds"``); with a table, the heavy one, unless it reads the bias cache and computes
    no table gradient (it then does no per-score table work): its own list where one was measured
    (``"cache"``), else the list without tables."""
    if kind in ("diag", "dk", "dv"):  # one list each per head-dim class
        return True
    if meta.get("SCORES") and (kind, _dim_class(block_d), "scores") in _CONFIGS:
        return "scores"
    if meta.get("DS_IN") and (kind, _dim_class(block_d), "ds") in _CONFIGS:
        return "ds"
    tables = bool(meta["HAS_POS"] or meta["HAS_TIME"])
    if tables and meta.get("BIAS_IN") and not (meta.get("POS_GRAD") or meta.get("TIME_GRAD")):
        return "cache" if (kind, _dim_class(block_d), "cache") in _CONFIGS else False
    return tables


# what each kernel changes in place, restored after every tuning trial so that each starts from what the call's real
# run starts from: the table-gradient buffers hold the sums of the kernels launched before (dq before band, dsgrad
# before diag), the bias cache the bias (the forward writes its scores over it)
_CHANGED_IN_PLACE = {"dq": ["DPTAB", "DTTAB"], "dq_inline": ["DPTAB", "DTTAB"], "band": ["DPTAB", "DTTAB"],
                     "dsgrad": ["DPTAB", "DTTAB"], "diag": ["DPTAB"], "fwd": ["BIAS"]}
_TUNERS: dict[tuple[str, int, bool | str], object] = {}  # one autotuner per (kernel, head-dim class, config_class)


def _tuned(kind: str, block_d: int, heavy: bool | str):
    if (kind, block_d, heavy) not in _TUNERS:
        bench = functools.partial(triton.testing.do_bench, warmup=5, rep=20)
        _TUNERS[kind, block_d, heavy] = triton.autotune(configs(kind, block_d, heavy), key=KEY,
                                                        restore_value=_CHANGED_IN_PLACE.get(kind), do_bench=bench)(
            _KERNELS[kind])
    return _TUNERS[kind, block_d, heavy]


def tuned_configs() -> dict[str, str]:
    """The autotuners' choices so far, ``"kernel/d/bias? key" -> config`` (for benchmark reports)."""
    names = {True: "bias", False: "plain", "cache": "cache", "ds": "ds", "scores": "scores"}
    return {f"{kind}/d{block_d}/{names[heavy]} {key}": str(cfg)
            for (kind, block_d, heavy), tuner in _TUNERS.items() for key, cfg in tuner.cache.items()}


def _tiles(rows: int, block: int) -> int:
    """Programs along the tile axis (at most 65535, the grid's z limit where samples come first; the kernels'
    stride loops cover any further tiles)."""
    return min(max(1, triton.cdiv(rows, block)), 65535)


_KERNELS = {"fwd": hstu_fwd_kernel, "dq": hstu_dq_kernel, "dq_inline": hstu_dq_kernel, "dkdv": hstu_dkdv_kernel,
            "dk": hstu_dkdv_kernel, "dv": hstu_dkdv_kernel, "band": hstu_band_grad_kernel,
            "dsgrad": hstu_ds_grad_kernel, "diag": hstu_diag_grad_kernel}
_PARTS = {"dkdv": 0, "dk": 1, "dv": 2}  # the dK/dV kernel's PART per kind
_PINNED: dict[str, triton.Config] = {}  # set only inside pinned(): benchmarks and tuning sweeps
_UNTUNED: list[bool] = []  # non-empty only inside untuned(): benchmarks over many shape classes


@contextlib.contextmanager
def pinned(**configs: tuple[int, ...]):
    """Run kernels with exactly the given ``(BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg])`` inside the block,
    bypassing the autotuner, e.g. ``with pinned(fwd=(128, 128, 8, 3)): ...`` (kinds ``fwd``, ``dq``,
    ``dkdv``, ``dk``, ``dv``, ``band``, ``dq_inline``, ``dsgrad``, ``diag``). A tuning hook for ``bench/attention_sweep.py``; ordinary calls never need it."""
    unknown = set(configs) - set(_KERNELS)
    if unknown:
        raise ValueError(f"pinned: unknown kernel kinds {sorted(unknown)}; kinds are {sorted(_KERNELS)}")
    saved = dict(_PINNED)
    _PINNED.update({kind: _config(*cfg) for kind, cfg in configs.items()})
    try:
        yield
    finally:
        _PINNED.clear()
        _PINNED.update(saved)


@contextlib.contextmanager
def untuned():
    """Inside the block, every kernel whose batch would be autotuned runs the first config of its list (the
    sweep's best at L = 4096) instead: one compile per kernel variant and no tuning trials. For benchmarks
    over many shape classes, where autotuning would take most of the run; results can only be slower than
    tuned ones."""
    _UNTUNED.append(True)
    try:
        yield
    finally:
        _UNTUNED.pop()


def launch(kind: str, grid_rows: int, num_samples: int, num_heads: int, args: tuple, meta: dict) -> None:
    """Run kernel ``kind`` (``fwd`` | ``dq`` | ``dq_inline`` | ``dkdv`` | ``dk`` | ``dv`` | ``band`` | ``dsgrad`` |
    ``diag``) over ``num_samples x num_heads x cdiv(grid_rows, tile)`` programs; the tile is BLOCK_M (all but the
    dK/dV kernel's kinds; the diag kernel's programs take :data:`DIAG_ROW_TILES` of them) or BLOCK_N (``dkdv``, and
    ``dk`` / ``dv``: its dK-only and dV-only launches). Tiles on the fastest
    grid axis (:data:`TILES_FIRST`, up to :data:`MAX_GRID_Z` samples): the programs that run together are the
    tiles of one sample and head, which share its keys and values in L2; each program starts with its heaviest
    causal tile (the kernels' tile loop runs from the last)."""
    block = "BLOCK_N" if kind in _PARTS else "BLOCK_M"
    rows_per_tile = DIAG_ROW_TILES if kind == "diag" else 1  # several query tiles per diag program
    if kind in _PARTS:
        meta = {"DS_IN": False, **meta, "PART": _PARTS[kind]}
    tiles_first = TILES_FIRST and num_samples <= MAX_GRID_Z
    meta = {**meta, "TILES_FIRST": tiles_first}

    def order(tiles: int) -> tuple[int, int, int]:
        return (tiles, num_heads, num_samples) if tiles_first else (num_samples, num_heads, tiles)

    if kind in ("dq", "dq_inline", "band", "dsgrad"):  # see triton_common.scatter_add_grad
        meta = {"DS_OUT": False, "DIAG": 0, **meta, "FEW_BUCKETS": 4 if interpreting() else 128,
                "SUPER": INTERPRET_SUPER if interpreting() else SUPER, "INLINE": kind in ("dq_inline", "dsgrad")}
    if interpreting():
        _interpreter_index_fix()
        tiles = {"BLOCK_M": INTERPRET_BLOCK, "BLOCK_N": INTERPRET_BLOCK}
        _KERNELS[kind][order(_tiles(grid_rows, tiles[block] * rows_per_tile))](*args, **meta, **tiles)
        return
    block_d = max(meta.get("BLOCK_DQK", 16), meta.get("BLOCK_DV", 16))  # the diag kernel has no head dim
    heavy = config_class(kind, block_d, meta)
    if kind in _PINNED or grid_rows < TUNE_FROM_LEN or _UNTUNED:
        if kind in _PINNED:
            cfg = _PINNED[kind]
        else:
            cfg = configs(kind, block_d, heavy)[-1 if grid_rows < TUNE_FROM_LEN else 0]
        _KERNELS[kind][order(_tiles(grid_rows, cfg.kwargs[block] * rows_per_tile))](
            *args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}))
        return

    def tuned_grid(cfg):
        return order(_tiles(grid_rows, cfg[block] * rows_per_tile))

    _tuned(kind, block_d, heavy)[tuned_grid](*args, **meta)
