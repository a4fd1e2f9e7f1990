"""The ``kalmannorm`` command line.

kalmannorm train --dataset fashion_mnist --norm bkn --stat-batch-size 2 --steps 1000
torchrun --nproc_per_node=2 -m kalmannorm train ...     # data parallel
kalmannorm compare                                       # the main job (preset "default")
kalmannorm compare --config grid.toml --jobs 2
kalmannorm demo | bench | norms | zoo

Errors the user can fix (kalmannorm.lab.errors.UserError: a bad option, missing or corrupt data,
a run folder in use, a diverged or interrupted run) are printed on one line; --debug shows the
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from kalmannorm.lab.errors import UserError
from kalmannorm.lab.train.config import (
    TrainConfig,
    config_from_dict,
    field_types,
    load_config,
    parse_value,
)
from kalmannorm.lab.train.plan import ConfigError
from kalmannorm.lab.train.presets import PRESETS


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


positive_int.__name__ = "positive integer"  # argparse names the type in its messages


def _int_list(text: str, option: str, minimum: int) -> list[int]:
    """A comma-separated list of integers >= ``minimum`` (a ConfigError otherwise)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < minimum for v in values):
        raise ConfigError(
            f"{option} takes comma-separated integers >= {minimum} (e.g. {option} 1,2,4), got "
            f"{text!r}"
        )
    return values


# -- demo, bench, norms -----------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> None:
    from kalmannorm.lab.demo import run_demo

    if args.batch_size % args.stat_batch_size:
        raise ConfigError(
            f"--batch-size {args.batch_size} does not divide into statistics groups of "
            f"--stat-batch-size {args.stat_batch_size}; use a multiple of it"
        )
    if args.batch_size > 1437:
        raise ConfigError("--batch-size exceeds the 1437 training digits")

    run_demo(
        steps=args.steps,
        batch_size=args.batch_size,
        stat_batch_size=args.stat_batch_size,
        seed=args.seed,
    )


def _bench(args: argparse.Namespace) -> None:
    from kalmannorm.lab.bench import SECTIONS, format_table, run_benchmark
    from kalmannorm.lab.train.distributed import check_device

    check_device(args.device)
    results = run_benchmark(
        quick=args.quick,
        compile=not args.no_compile,
        device=args.device,
        threads=args.threads,
        sections=tuple(args.only or SECTIONS),
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(json.dumps(results, indent=2) if args.json else format_table(results))


def _analyze(args: argparse.Namespace) -> None:
    """``kalmannorm analyze WHAT RUN``: the paper's evidence measured on a trained run."""
    from pathlib import Path

    from kalmannorm.lab import analysis
    from kalmannorm.lab.analysis.run import load_run
    from kalmannorm.lab.train.loop import prepare_run_folder

    run = load_run(args.run_dir)
    out = Path(args.out) if args.out else Path(args.run_dir) / "analysis"
    prepare_run_folder(out)
    data, s = run.data.test_batches, run.config.stat_batch_size
    label = f"{run.config.norm} (s={s})"
    limit = {"max_samples": args.max_samples}
    if args.what == "variance-gap":
        gaps = analysis.measure_variance_gap(run.model, data, stat_batch_size=s, **limit)
        print(analysis.variance_gap_markdown({label: gaps}))
        if gaps:
            analysis.write_variance_gap_heatmap(gaps, out / "variance_gap.png", title=label)
            print(f"\nheatmap: {out / 'variance_gap.png'}")
    elif args.what == "eval-modes":
        result = analysis.eval_mode_accuracy(run.model, data, stat_batch_size=s, **limit)
        print(analysis.eval_modes_markdown({label: result}))
    elif args.what == "estimation-error":
        sizes = tuple(args.stat_batch_sizes) if args.stat_batch_sizes else (s,)
        table = analysis.measure_estimation_error(run.model, data, sizes, **limit)
        print(analysis.estimation_error_markdown(table, per_layer=True))
    elif args.what == "gain":
        snapshot = analysis.gain_snapshot(run.model)
        print(analysis.gain_markdown(snapshot))
        if snapshot:
            analysis.write_gain_distribution_plot(snapshot, out / "gain.png")
            print(f"\nplot: {out / 'gain.png'}")
    elif args.what == "params":
        print(analysis.parameters_markdown(analysis.compare_parameters({label: run.model}, label)))
    elif args.what == "prior-error":
        from kalmannorm.lab.analysis import prior_error

        group = s or 2
        rows = prior_error.measure_prior_error(run.model, data(16 * group))
        print(prior_error.prior_error_markdown(rows))
        prior_error.write_prior_error_plot(rows, out / "prior_error.png")
        print(f"\nplot: {out / 'prior_error.png'}")


def _norms(args: argparse.Namespace) -> None:
    from kalmannorm import available_norms
    from kalmannorm.lab import zoo

    for name, description in available_norms().items():
        print(f"{name:<10} {description}")
        print(f"{'':<10} parameters over BatchNorm's 2C: {zoo.COST_FORMULA.get(name, '0')}")
    if args.costs:
        models = tuple(m.strip() for m in args.models.split(",") if m.strip())
        print("\nparameters of the converted model / of the BatchNorm model (chain traced):\n")
        print(zoo.costs_markdown(zoo.parameter_costs(models, variants=True)))


def _zoo(args: argparse.Namespace) -> None:
    from kalmannorm.lab import zoo

    code = zoo.run(args)
    if code:
        raise SystemExit(code)


# -- train ------------------------------------------------------------------------------------


def add_config_options(parser: argparse.ArgumentParser, exclude: set[str] = frozenset()) -> None:
    """One option per TrainConfig key (``batch_size`` -> ``--batch-size``); an option that is
    not given is absent from the namespace, so it overrides neither a config file nor a
    default."""
    types = field_types()
    for f in dataclasses.fields(TrainConfig):
        if f.name in exclude:
            continue
        hint, help_text = types[f.name], f.metadata["help"]
        if f.default is not dataclasses.MISSING and f.default is not None:
            help_text += f" (default: {f.default})"
        common = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if f.name.endswith("_options"):
            flag = "--" + f.name.removesuffix("_options") + "-option"
            parser.add_argument(flag, action="append", metavar="KEY=VALUE", **common)
        elif hint is bool:
            flag = "--" + f.name.replace("_", "-")
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        else:
            flag = "--" + f.name.replace("_", "-")
            parser.add_argument(flag, type=_parser_for(hint), metavar=f.name.upper(), **common)


def _parser_for(hint: Any):
    if hint is list:

        def numbers(text: str) -> list[float]:
            return [float(v) for v in text.split(",") if v.strip()]

        numbers.__name__ = "comma-separated numbers"  # for argparse's messages
        return numbers
    base = next(
        (t for t in (int, float, str) if t == hint or t in getattr(hint, "__args__", ())), str
    )
    optional = type(None) in getattr(hint, "__args__", ())

    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        return base(text)

    parse.__name__ = base.__name__  # argparse names the type in its error messages
    return parse


def _key_values(items: list[str], option: str) -> dict[str, Any]:
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} takes KEY=VALUE, got {item!r}")
        values[key.strip()] = parse_value(value.strip())
    return values


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig keys given on the command line, option lists turned into tables."""
    keys = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in keys}
    for key in ("norm_options", "model_options"):
        if key in given:
            given[key] = _key_values(given[key], "--" + key.removesuffix("_options") + "-option")
    return given


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the saved config of a run being resumed, then --config, then options."""
    given = _given(args)
    base = TrainConfig()
    saved = Path(given.get("out", base.out)) / "config.toml"
    if args.resume and saved.exists() and not args.config:
        base = load_config(saved)
    if args.config:
        base = load_config(args.config, base)
    return config_from_dict(given, base)


def _train(args: argparse.Namespace) -> None:
    if args.list:
        _print_choices()
        return
    from kalmannorm.lab.train import train

    train(config_from_args(args), resume=args.resume)


def _print_choices() -> None:
    from kalmannorm import available_norms
    from kalmannorm.lab.data import available_datasets
    from kalmannorm.lab.models import available_models

    print("datasets:")
    for name, description in available_datasets().items():
        print(f"  {name:<15} {description}")
    print("models:\n  " + ", ".join(available_models()) + ", tv:<any torchvision classifier>")
    print("norms:\n  none            plain BatchNorm, not converted")
    for name, description in available_norms().items():
        print(f"  {name:<15} {description}")


# -- compare ----------------------------------------------------------------------------------


def _compare(args: argparse.Namespace) -> None:
    from kalmannorm.lab.train.compare import Variant, compare, load_compare_config

    if args.config and args.preset:
        raise ConfigError("give either --config or --preset, not both")
    cfg = load_compare_config(args.config) if args.config else PRESETS[args.preset or "default"]()
    given = _given(args)
    for key in ("norm_options", "model_options"):
        if key in given:
            cfg.train[key] = {**cfg.train.get(key, {}), **given.pop(key)}
    cfg.train.update(given)
    config_from_dict(cfg.train)  # unknown keys and wrong types are refused here
    if args.norms is not None:
        cfg.norms = [Variant(n.strip(), n.strip()) for n in args.norms.split(",") if n.strip()]
        if not cfg.norms:
            raise ConfigError(f"--norms takes comma-separated norm names, got {args.norms!r}")
    if args.stat_batch_sizes is not None:
        cfg.stat_batch_sizes = _int_list(args.stat_batch_sizes, "--stat-batch-sizes", 1)
    if args.seeds is not None:
        cfg.seeds = _int_list(args.seeds, "--seeds", 0)
    if args.baseline is not None:
        cfg.baseline = Variant(args.baseline, args.baseline) if args.baseline else None
    cfg.jobs = args.jobs or cfg.jobs
    cfg.out = args.grid_out or cfg.out
    compare(cfg, threads=given.get("threads"))


# -- reproduce --------------------------------------------------------------------------------


def _reproduce(args: argparse.Namespace) -> None:
    from kalmannorm.lab.reproduce import reproduce

    overrides: dict[str, Any] = {}
    for key in ("steps", "device", "data_dir", "train_subset", "test_subset"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    report = reproduce(
        args.budget,
        out=args.out,
        runs=args.runs,
        grids=[g for g in args.grids.split(",") if g] if args.grids else None,
        norms=[n for n in args.norms.split(",") if n] if args.norms else None,
        overrides=overrides,
        train=not args.no_train,
        bench=args.bench,
        bench_json=args.bench_json,
        threads=args.threads,
    )
    print(f"report: {report}")


# -- the parser -------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (the usage is one ``--help`` away); its command
    parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kalmannorm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="BN vs BKN at statistics-batch 2 on real digits")
    demo.add_argument("--steps", type=positive_int, default=300)
    demo.add_argument("--batch-size", type=positive_int, default=32)
    demo.add_argument("--stat-batch-size", type=positive_int, default=2)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    bench = commands.add_parser("bench", help="BKN / BatchNorm time ratios on this machine")
    bench.add_argument("--quick", action="store_true", help="small sizes, no compile (1-2 min)")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument(
        "--only",
        nargs="+",
        choices=("classic", "norms", "micro"),  # kalmannorm.lab.bench.SECTIONS (not imported:
        metavar="SECTION",  # the parser is built without torch)
        help="run only these parts (classic: layers and steps, norms, micro: batch 2-8 steps)",
    )
    bench.set_defaults(run=_bench)

    analyze = commands.add_parser("analyze", help="the paper's evidence on a trained run")
    analyze.add_argument(
        "what",
        choices=["variance-gap", "eval-modes", "estimation-error", "gain", "params", "prior-error"],
    )
    analyze.add_argument(
        "run_dir", metavar="RUN", help="the --out folder of a `kalmannorm train` run"
    )
    analyze.add_argument("--out", help="where to write figures (default: RUN/analysis)")
    analyze.add_argument(
        "--max-samples", type=positive_int, help="use at most this many test images"
    )
    analyze.add_argument(
        "--stat-batch-sizes",
        type=positive_int,
        nargs="+",
        help="estimation-error: group sizes to measure",
    )
    analyze.set_defaults(run=_analyze)

    norms = commands.add_parser("norms", help="list the registered norms and their costs")
    norms.add_argument(
        "--costs", action="store_true", help="measure each norm's parameter cost per model"
    )
    norms.add_argument("--models", default="resnet18,resnet50,mobilenet_v2,efficientnet_b0",
                       help="torchvision models for --costs")  # fmt: skip
    norms.set_defaults(run=_norms)

    zoo = commands.add_parser(
        "zoo", help="torchvision/timm families x every norm: train, eval, checkpoints, fold"
    )
    from kalmannorm.lab.zoo import add_arguments as add_zoo_arguments

    add_zoo_arguments(zoo)
    zoo.set_defaults(run=_zoo)

    train = commands.add_parser(
        "train",
        help="train one model (gradient batch, statistics batch), resumable, torchrun-ready",
        description="Train one model. Options override --config, which overrides defaults.",
    )
    train.add_argument("--config", help="TOML file of training keys (as saved in config.toml)")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint (its config.toml is the base)",
    )
    train.add_argument("--list", action="store_true", help="list datasets, models and norms")
    add_config_options(train)
    train.set_defaults(run=_train)

    compare = commands.add_parser(
        "compare",
        help="a grid of runs (norms x statistics batches x seeds) and its summary table",
        description="Run a grid of training runs and summarise it. Without --config: the "
        "preset 'default' (the main job). Training options below apply to every run.",
    )
    compare.add_argument("--config", help="compare TOML file ([compare] and [train] tables)")
    compare.add_argument("--preset", choices=sorted(PRESETS), help="a built-in grid")
    compare.add_argument(
        "--out", dest="grid_out", help="folder of the grid (one sub-folder per run)"
    )
    compare.add_argument("--jobs", type=positive_int, help="runs in parallel processes")
    compare.add_argument("--norms", help="comma-separated norm names")
    compare.add_argument("--stat-batch-sizes", help="comma-separated statistics batch sizes")
    compare.add_argument("--seeds", help="comma-separated seeds")
    compare.add_argument("--baseline", help="norm of the whole-batch baseline ('' for none)")
    add_config_options(compare, exclude={"out", "seed", "norm", "stat_batch_size"} | {"progress"})
    compare.set_defaults(run=_compare)

    reproduce = commands.add_parser(
        "reproduce",
        help="train a budget's grids, measure the paper's evidence, write REPORT.md",
        description="Train every grid of a budget (finished runs are skipped, killed ones "
        "resumed), measure the evidence on the trained models and write REPORT.md with its "
        "figures. 'small': Fashion-MNIST on 2 CPU cores in about two hours; 'paper': the "
        "paper's CIFAR and ImageNet recipes, for GPUs.",
    )
    reproduce.add_argument("--budget", choices=["residual", "small", "paper"], default="residual")
    reproduce.add_argument(
        "--out",
        help="folder of REPORT.md and figures (default: docs/results for the residual budget, "
        "docs/results/small-cnn, docs/results/paper)",
    )
    reproduce.add_argument(
        "--runs",
        help="folder of the grids (default: docs/results/residual/runs, runs/reproduce-BUDGET)",
    )
    reproduce.add_argument("--grids", help="comma-separated grid names (default: all)")
    reproduce.add_argument("--norms", help="comma-separated norm labels (default: all)")
    reproduce.add_argument(
        "--steps", type=positive_int, help="train every run for only this many steps"
    )
    reproduce.add_argument("--device", help="override the runs' device (e.g. cpu)")
    reproduce.add_argument("--data-dir", help="override the runs' data folder")
    reproduce.add_argument("--train-subset", type=positive_int, help="train on this many images")
    reproduce.add_argument("--test-subset", type=positive_int, help="evaluate on this many images")
    reproduce.add_argument("--threads", type=positive_int, help="CPU threads per run")
    reproduce.add_argument(
        "--no-train", action="store_true", help="only read finished runs and write the report"
    )
    reproduce.add_argument(
        "--bench", action="store_true", help="also time BKN vs BN (kalmannorm bench, no compile)"
    )
    reproduce.add_argument(
        "--bench-json",
        help=(
            "use a saved `python -m kalmannorm.lab.bench --json PATH` result for the throughput "
            "table"
        ),
    )
    reproduce.set_defaults(run=_reproduce)

    # Options are spelled out (no prefix matching: --stat-batch is not --stat-batch-size), and
    # --debug (before or after the command) shows the traceback of a user error.
    debug_help = "on an error, show the traceback instead of the one-line message"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    for command in [parser, *commands.choices.values()]:
        command.allow_abbrev = False
        if command is not parser:
            command.add_argument(
                "--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except UserError as error:
        if args.debug:
            raise
        failed = "" if error.exit_code == 1 else "error: "
        print(f"kalmannorm {args.command}: {failed}{error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"kalmannorm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
