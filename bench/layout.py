"""Pretraining throughput of the user-level layout against the per-exposure layout (exposures per second).

Both runs are ``recfm pretrain`` on the same synthetic world, model and token budget per batch
(``train.max_tokens``), one process each; only ``data.layout`` differs. A user-level sample carries all of a
user's exposures of a window behind one shared history, a per-exposure sample one exposure with its own
copy of the history, so the layouts are compared in exposures (trained target tokens) per second:
samples/s of the run times the mean exposures per training sample of its built data.

Usage (repository root, or anywhere with recfm installed)::

    python bench/layout.py --steps 200 --model small                  # GPU
    python bench/layout.py --cpu --steps 5 --model tiny --size tiny   # smoke test

Prints a table and writes ``<out>/layout.json`` (default ``bench/results/layout``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling import mean_exposures  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run(layout: str, args, out: Path) -> dict:
    run_out = out / layout
    shutil.rmtree(run_out, ignore_errors=True)  # a left-over checkpoint would make the run resume
    overrides = [
        f"out={run_out}", f"model={args.model}", f"train.steps={args.steps}", f"train.max_tokens={args.max_tokens}",
        "train.ckpt_every=0", f"train.log_every={max(1, args.steps // 10)}", f"data.synth.size={args.size}",
        f"data.layout={layout}", f"train.device={'cpu' if args.cpu else 'cuda'}", "train.eval_batches=1",
    ]
    cmd = [sys.executable, "-m", "recfm", "pretrain", *overrides]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    result = json.loads((run_out / "results.json").read_text())
    per_sample = mean_exposures(run_out / "data", result["eval_windows"][0], result["scenarios"])
    return {"layout": layout, "samples_per_s": result["samples_per_s"], "tokens_per_s": result["tokens_per_s"],
            "exposures_per_sample": per_sample, "exposures_per_s": result["samples_per_s"] * per_sample,
            "train_seconds": result["train_seconds"], "steps": result["steps"], "device": result["device"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--model", default="small")
    p.add_argument("--size", default="default", help="synthetic world size (tiny|small|default|large|huge)")
    p.add_argument("--max-tokens", type=int, default=32768, help="token budget per batch (both layouts)")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "layout"))
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = [run(layout, args, out) for layout in ("user", "exposure")]
    print(f"\n{'layout':<9} {'samples/s':>11} {'exposures/sample':>17} {'exposures/s':>12} {'tokens/s':>12}")
    for r in rows:
        print(f"{r['layout']:<9} {r['samples_per_s']:>11,.1f} {r['exposures_per_sample']:>17.2f} "
              f"{r['exposures_per_s']:>12,.1f} {r['tokens_per_s']:>12,.0f}")
    ratio = rows[0]["exposures_per_s"] / rows[1]["exposures_per_s"]
    print(f"user-level over per-exposure, exposures/s: {ratio:.2f}x")
    report = {"args": vars(args), "runs": rows, "user_over_exposure_exposures_per_s": ratio}
    (out / "layout.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'layout.json'}")


if __name__ == "__main__":
    main()
