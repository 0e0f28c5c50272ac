"""Pretraining throughput on 1 GPU vs N GPUs (data parallel through torchrun + NCCL).

For each process count the script runs ``torchrun --nproc_per_node N -m recfm pretrain`` on the same
built samples (synthesized and built once, by the first run) and reads the run's ``results.json``:
``steady_samples_per_s`` / ``steady_tokens_per_s`` (summed over ranks by the recipe; after the first log
window, so compilation and autotuning stay out) give the table, the whole run's rates (``samples_per_s``, from
the first step) are kept in the JSON. Exposures/s is samples/s times the mean exposures per training sample of
the built data. NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``,
``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``).

Usage (repository root)::

    python bench/scaling.py --gpus 1,2,4,8 --steps 300                         # H100/H200 host
    python bench/scaling.py --cpu --gpus 1,2 --steps 10 --size tiny           # smoke test, gloo on CPU

Prints a table and writes ``<out>/scaling.json`` (default ``bench/results/scaling``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from recfm.foundation.data import schema as S

REPO = Path(__file__).resolve().parents[1]


def mean_exposures(samples: Path, first_eval_window: int, scenarios: list[str]) -> float:
    """Mean exposures of the trained ``scenarios`` per training sample of the built data."""
    total = rows = 0
    for f in sorted(samples.rglob("*.parquet")):
        table = pq.read_table(f)
        keep = [w < first_eval_window for w in table.column("window").to_pylist()]
        targets = [S.target_column(s) for s in scenarios if S.target_column(s) in table.column_names]
        for c in targets:
            lengths = table.column(c).combine_chunks().value_lengths().to_pylist()
            total += sum(n or 0 for n, k in zip(lengths, keep) if k)
        rows += sum(keep)
    return total / max(rows, 1)


def run(n: int, args, out: Path, samples: Path | None) -> dict:
    run_out = out / f"n{n}"
    for stale in ("checkpoints", "tb"):  # a left-over checkpoint would make the run resume (and skip training)
        shutil.rmtree(run_out / stale, ignore_errors=True)
    for stale in ("results.json", "train_log.jsonl"):
        (run_out / stale).unlink(missing_ok=True)
    overrides = [
        f"out={run_out}", f"model={args.model}", f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
        f"train.ckpt_every=0", f"train.log_every={max(1, args.steps // 10)}", f"data.synth.size={args.size}",
        f"train.device={'cpu' if args.cpu else 'cuda'}", "train.eval_batches=1", *args.override,
    ]
    if args.max_tokens:
        overrides.append(f"train.max_tokens={args.max_tokens}")
    if samples is not None:
        overrides.append(f"data.samples={samples}")
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    if args.cpu:
        env["OMP_NUM_THREADS"] = "1"  # one thread per process: the counts compare processes, not threads
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "recfm",
           "pretrain", *overrides]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return json.loads((run_out / "results.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", default="1,2,4,8", help="comma-separated process counts")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--model", default="small")
    p.add_argument("--size", default="default", help="synthetic world size (tiny|small|default|large|huge)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch per rank")
    p.add_argument("--max-tokens", type=int, default=None, help="token budget per batch per rank")
    p.add_argument("--cpu", action="store_true", help="gloo on CPU processes (smoke test)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "scaling"))
    p.add_argument("override", nargs="*", help="extra key=value run overrides")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    counts = [int(x) for x in args.gpus.split(",")]
    rows, samples = [], None
    for n in counts:
        r = run(n, args, out, samples)
        if samples is None:
            samples = out / f"n{n}" / "data"
        steady = r.get("steady_samples_per_s") is not None
        rows.append({"processes": n, "rate": "steady" if steady else "whole run",
                     "samples_per_s": r["steady_samples_per_s"] if steady else r["samples_per_s"],
                     "tokens_per_s": r["steady_tokens_per_s"] if steady else r["tokens_per_s"],
                     "whole_run_samples_per_s": r["samples_per_s"],
                     "train_seconds": r["train_seconds"], "steps": r["steps"], "device": r["device"],
                     "final_loss": r["final_loss"], "eval_windows": r["eval_windows"], "scenarios": r["scenarios"]})
    per_sample = mean_exposures(samples, rows[0]["eval_windows"][0], rows[0]["scenarios"])
    base = rows[0]["samples_per_s"] / rows[0]["processes"]
    print(f"\n{'procs':>5} {'samples/s':>12} {'exposures/s':>13} {'tokens/s':>13} {'speed-up':>9} {'efficiency':>10}"
          f" {'whole run':>10}")
    for row in rows:
        row["exposures_per_s"] = row["samples_per_s"] * per_sample
        row["speedup"] = row["samples_per_s"] / rows[0]["samples_per_s"]
        row["efficiency"] = row["samples_per_s"] / (base * row["processes"])
        print(f"{row['processes']:>5} {row['samples_per_s']:>12,.1f} {row['exposures_per_s']:>13,.1f} "
              f"{row['tokens_per_s']:>13,.0f} {row['speedup']:>9.2f} {row['efficiency']:>10.2f}"
              f" {row['whole_run_samples_per_s']:>10,.1f}")
    print("samples/s: after the first log window (train.log_every); whole run: from the first step")
    report = {"args": {k: v for k, v in vars(args).items()}, "mean_exposures_per_sample": per_sample, "runs": rows}
    (out / "scaling.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out / 'scaling.json'}")


if __name__ == "__main__":
    main()
