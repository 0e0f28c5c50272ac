"""The ``recfm`` command line: a thin layer over plain Python functions.

Every subcommand parses its arguments, calls one library function and prints its result. This is the only
place that exits the process; library code raises :class:`recfm.errors.RecfmError` with a message that
names the file, key or column at fault.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from recfm.errors import RecfmError


def _scenarios(args: argparse.Namespace) -> int:
    from recfm.scenarios import registry

    if args.action == "list":
        print(registry.format_list(registry.load_world(args.world)))
    elif args.action == "show":
        world = registry.load_world(args.world)
        names = args.names or list(world.scenario_names)
        print(registry.format_show(world, names))
    else:  # validate
        print(registry.validate_files(args.paths))
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    from recfm.foundation.data import synth

    report = synth.synth_world(out_dir=args.out, size=args.size, seed=args.seed, world=args.world)
    print(report.format())
    return 0


def _data_build(args: argparse.Namespace) -> int:
    from recfm.foundation.data import build

    report = build.build_samples(
        world=args.world,
        events=args.events,
        exposures=args.exposures,
        out=args.out,
        layout=args.layout,
        memory_mb=args.memory_mb,
        on_bad_row=args.on_bad_row,
    )
    print(report.format())
    return 0


def _data_convert(args: argparse.Namespace) -> int:
    from recfm.foundation.data.real import convert

    report = convert.convert(args.dataset, src=args.src, out=args.out)
    print(report.format())
    return 0


def _data_stats(args: argparse.Namespace) -> int:
    from recfm.foundation.data import stats

    print(stats.format_stats(stats.dataset_stats(args.path)))
    return 0


def _model_summary(args: argparse.Namespace) -> int:
    from recfm.foundation.model import summary

    print(summary.format_summary(summary.summarize(args.config, history=args.history, realtime=args.realtime, targets=args.targets)))
    return 0


def _recipe(name: str):
    def run(args: argparse.Namespace) -> int:
        from recfm import recipes

        fn = getattr(recipes, name)
        config, overrides = args.config, list(args.overrides)
        if config is not None and "=" in config and not os.path.exists(config):  # `recfm pretrain key=value`
            config, overrides = None, [config, *overrides]
        result = fn(config, overrides=overrides, **{k: v for k, v in vars(args).items() if k in _RECIPE_EXTRA[name]})
        if result is not None and hasattr(result, "format"):
            print(result.format())
        elif result is not None:
            print(json.dumps(result, indent=2, default=str))
        return 0

    return run


def _nextitem(args: argparse.Namespace) -> int:
    from recfm.recipes.nextitem import format_table, nextitem

    seeds = None
    if args.seeds:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise RecfmError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    print(format_table(nextitem(args.config, overrides=args.overrides, seeds=seeds, out=args.out)))
    return 0


_RECIPE_EXTRA = {"pretrain": set(), "finetune": {"from_ckpt"}, "evaluate": {"ckpt"}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recfm", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    sc = sub.add_parser("scenarios", help="inspect and validate scenario YAML")
    sc_sub = sc.add_subparsers(dest="action", required=True)
    for action in ("list", "show"):
        a = sc_sub.add_parser(action)
        a.add_argument("--world", default=None, help="world YAML (default: the embedded world)")
        if action == "show":
            a.add_argument("names", nargs="*", help="scenario names (default: all)")
        a.set_defaults(func=_scenarios)
    v = sc_sub.add_parser("validate", help="strictly load world/scenario YAML files, report every error")
    v.add_argument("paths", nargs="+")
    v.set_defaults(func=_scenarios)

    data = sub.add_parser("data", help="generate, convert and aggregate data")
    dsub = data.add_subparsers(dest="action", required=True)
    s = dsub.add_parser("synth", help="generate the embedded multi-scenario world (raw logs + oracle)")
    s.add_argument("--size", default="default", help="tiny | small | default | large | huge")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="runs/world")
    s.add_argument("--world", default=None, help="world YAML (default: the embedded world)")
    s.set_defaults(func=_data_synth)
    b = dsub.add_parser("build", help="aggregate raw logs into user-level (or per-exposure) samples")
    b.add_argument("--world", default=None, help="world YAML (default: the embedded world)")
    b.add_argument("--events", required=True, help="event log: Parquet/CSV file or folder")
    b.add_argument("--exposures", required=True, help="exposure log: Parquet/CSV file or folder")
    b.add_argument("--out", required=True, help="output folder of Parquet files")
    b.add_argument("--layout", choices=["user", "exposure"], default="user")
    b.add_argument("--memory-mb", type=int, default=1024, help="memory budget for the streaming build")
    b.add_argument("--on-bad-row", choices=["error", "skip"], default="error")
    b.set_defaults(func=_data_build)
    c = dsub.add_parser("convert", help="convert a public dataset into recfm raw logs")
    c.add_argument("dataset", help="ml-1m | ml-100k | amazon-beauty | douban | retailrocket")
    c.add_argument("--src", required=True, help="the dataset's folder")
    c.add_argument("--out", required=True)
    c.set_defaults(func=_data_convert)
    st = dsub.add_parser("stats", help="rows, bytes and tokens of a built sample folder")
    st.add_argument("path")
    st.set_defaults(func=_data_stats)

    m = sub.add_parser("model", help="inspect model configs")
    msub = m.add_subparsers(dest="action", required=True)
    ms = msub.add_parser("summary", help="parameters and analytic FLOPs per sample")
    ms.add_argument("config")
    ms.add_argument("--history", type=int, default=1000)
    ms.add_argument("--realtime", type=int, default=100)
    ms.add_argument("--targets", type=int, default=50)
    ms.set_defaults(func=_model_summary)

    for name, helptext in [
        ("pretrain", "train backbone, adapters and heads on all scenarios of a config"),
        ("finetune", "train one scenario's adapter and head on a pretrained backbone"),
        ("evaluate", "per-scenario AUC / GAUC / logloss (HR/NDCG for next-item tasks)"),
    ]:
        r = sub.add_parser(name, help=helptext)
        r.add_argument("config", nargs="?", default=None, help="run YAML (default: the embedded world)")
        r.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
        if name == "finetune":
            r.add_argument("--from", dest="from_ckpt", required=True, help="pretrained checkpoint")
        if name == "evaluate":
            r.add_argument("--ckpt", required=True)
        r.set_defaults(func=_recipe(name))

    n = sub.add_parser("nextitem", help="next-item retrieval (HSTU or SASRec), full-corpus HR/NDCG over seeds")
    n.add_argument("config", help="next-item YAML, or a shipped name: ml-1m/hstu, ml-1m/sasrec, amazon-beauty/hstu, ...")
    n.add_argument("overrides", nargs="*", help="key=value overrides, e.g. backbone.layer.impl=triton train.max_minutes=2")
    n.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's)")
    n.add_argument("--out", default=None, help="results folder (default: the config's out)")
    n.set_defaults(func=_nextitem)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RecfmError as e:
        print(f"recfm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recfm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
