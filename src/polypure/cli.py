"""The ``polypure`` command.

::

    polypure run [CONFIG] [--set KEY=VALUE ...]   every stage (no CONFIG: the bundled demo)
    polypure topk CONFIG                          one stage alone (any of polypure.pipeline.stages.NAMES but report)
    polypure inspect STORE                        what a store holds
    polypure report STORE                         the browsable HTML report of a store
    polypure export STORE DIR [--format parquet]  metrics, summary and comparisons as CSV or Parquet tables
    polypure compare A.h5 B.h5 [...] --out DIR    stores compared with the first one (CSV and an HTML page)
    polypure check-rules CONFIG [--ideal]         check composites and canonizers on a few samples
    polypure list [KIND]                          registered models, composites, canonizers, ...

Exit status: 0 success, 1 runtime failure, 2 bad input (``InputError``: a usage or config error, or a file,
store, model or plugin that cannot be used as given).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from polypure import __version__
from polypure.errors import ConfigError, InputError, PolypureError
from polypure.pipeline.stages import NAMES, STAGES


def _add_run_options(parser: argparse.ArgumentParser, config_optional: bool) -> None:
    if config_optional:
        parser.add_argument("config", nargs="?", default=None,
                            help="YAML config file or bundled config name (default: demo)")
    else:
        parser.add_argument("config", help="YAML config file or bundled config name (e.g. demo)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, values read as YAML, e.g. --set topk.k=20 relevance.neurons=0:8")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing store made with a different config")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    parser.add_argument("--executor", choices=["local", "ray"], default=None,
                        help="where the top-K, relevance and embedding work runs (executor.kind)")
    parser.add_argument("--workers", type=int, default=None, metavar="N", help="Ray workers (executor.workers)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``polypure`` command."""
    parser = argparse.ArgumentParser(prog="polypure", description="Split polysemantic neurons into pure "
                                     "sub-features by clustering conditional relevance (PURE) at any layer.")
    parser.add_argument("--version", action="version", version=f"polypure {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="run every stage of a config (default: the bundled demo)",
                         description="Run every stage of a config in order, skipping work already complete "
                                     "in its store.")
    _add_run_options(run, config_optional=True)
    run.add_argument("--stages", default=None,
                     help=f"comma-separated subset of stages to run, in order ({', '.join(NAMES)})")

    for stage in STAGES:
        if stage.NAME == "report":
            continue  # `polypure report STORE` writes the report of any store, without its config
        text = stage.HELP
        p = sub.add_parser(stage.NAME, help=text, description=text[0].upper() + text[1:] + ".")
        _add_run_options(p, config_optional=False)

    report = sub.add_parser("report", help="write the browsable HTML report of a store",
                            description="Write a self-contained report folder (index with the summary table and "
                                        "a sortable list of neurons, a page per neuron with its figures) that "
                                        "opens from disk in a browser.")
    report.add_argument("store", help="HDF5 store written by polypure")
    report.add_argument("--out", default=None, help="output folder (default: <store>_report next to the store)")
    report.add_argument("--neurons", type=int, default=None,
                        help="neuron pages per target (default 8; at most the largest target's neurons)")
    report.add_argument("--view", choices=["auto", "full", "crop"], default="auto",
                        help="thumbnails of whole images or of the crop view's crops")
    report.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")

    export = sub.add_parser("export", help="write a store's metrics, summary and comparisons as tables",
                            description="Write metrics (every per-neuron metric in long form), summary (the "
                                        "summary table) and comparisons (each space against a baseline space, "
                                        "Holm-adjusted) into DIR as CSV or Parquet files; prints their paths.")
    export.add_argument("store", help="HDF5 store written by polypure")
    export.add_argument("out", metavar="DIR", help="output folder (made if needed)")
    export.add_argument("--format", choices=["csv", "parquet"], default="csv",
                        help="csv (default) or parquet (needs pyarrow: pip install 'polypure[parquet]')")
    export.add_argument("--baseline", default=None, metavar="SPACE",
                        help="space the comparisons are against (default: each target's last attribution layer)")

    compare = sub.add_parser("compare", help="compare the metrics of several stores with the first one",
                             description="Compare every per-neuron metric of each store with the first store's: "
                                         "paired tests (Wilcoxon) where two stores share samples, neurons and "
                                         "references, unpaired ones (Mann-Whitney U) otherwise, Holm-adjusted; "
                                         "writes comparison.csv, summaries.csv (the summaries side by side) and "
                                         "index.html into DIR and prints their paths.")
    compare.add_argument("stores", nargs="+", metavar="STORE", help="two or more HDF5 stores; the first is the baseline")
    compare.add_argument("--out", required=True, metavar="DIR", help="output folder (made if needed)")
    compare.add_argument("--metric", default=None, help="only this metric label (e.g. 'ARI class')")
    compare.add_argument("--test", choices=["auto", "paired", "unpaired"], default="auto",
                         help="auto (default): paired where the stores allow it; paired: refuse where they do not")
    compare.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals")

    train = sub.add_parser("demo-train", help="retrain a demo model on synthetic concept images",
                           description="Train a demo model (the demo ResNet, or with --model demo_vit the demo "
                                       "ViT) from a fixed seed on fresh synthetic images with merged-shape "
                                       "labels; writes MODEL.safetensors and MODEL.json (settings and held-out "
                                       "accuracy).")
    train.add_argument("--model", choices=["demo_resnet", "demo_vit"], default="demo_resnet",
                       help="which demo model to train (default: demo_resnet)")
    train.add_argument("--out", default=None, help="output folder (default: the weights shipped with polypure)")
    train.add_argument("--epochs", type=int, default=None,
                       help="training epochs (default: the model's own, 12 for demo_resnet, 8 for demo_vit)")
    train.add_argument("--per-epoch", type=int, default=None,
                       help="fresh training images per epoch (default: the model's own, 8000 for demo_resnet)")
    train.add_argument("--seed", type=int, default=0, help="seed of the images and the initial weights (default 0)")
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")

    rules = sub.add_parser("check-rules", help="check the relevance rule's composite and canonizers on a few samples",
                           description="On the first samples of the data and the first neurons of each target: "
                                       "how much the canonizers change the model, whether LRP relevance is "
                                       "conserved, and how often it is all zero or non-finite. Prints one "
                                       "table; exit status 1 names each failed check.")
    rules.add_argument("config", help="YAML config file or bundled config name (e.g. demo)")
    rules.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override config keys, values read as YAML")
    rules.add_argument("--samples", type=int, default=None,
                       help="the first N samples of the data (default: 8, or all of fewer; at most all)")
    rules.add_argument("--neurons", type=int, default=None,
                       help="the first M selected neurons of each target (default: 4, or all of fewer; at most "
                            "the largest target's)")
    rules.add_argument("--ideal", action="store_true",
                       help="check a copy of the model with every bias and normalisation shift set to zero, on "
                            "which LRP composites conserve relevance exactly: a median off 1 is a canonizer gap")
    rules.add_argument("-q", "--quiet", action="store_true", help="log warnings only")

    inspect = sub.add_parser("inspect", help="show what a store holds", description="Show a store's layers, "
                             "shapes, completeness and the config that made it.")
    inspect.add_argument("store", help="HDF5 store written by polypure")
    inspect.add_argument("--no-config", action="store_true", help="leave out the config")

    lister = sub.add_parser("list", help="list registered names", description="List registered models, "
                            "composites, canonizers, clusterers, evaluators, data kinds and dictionary kinds "
                            "(plugins included).")
    lister.add_argument("kind", nargs="?", default=None,
                        choices=["models", "composites", "canonizers", "clusterers", "evaluators", "datasets",
                                 "dictionaries"],
                        help="only this kind of name (default: every kind)")
    return parser


def _registries():
    from polypure.attribution.composites import CANONIZERS, COMPOSITES
    from polypure.models.factory import MODELS
    out = {"models": MODELS, "composites": COMPOSITES, "canonizers": CANONIZERS}
    try:
        from polypure.evaluation.clustering import CLUSTERERS
        out["clusterers"] = CLUSTERERS
    except ImportError:
        pass
    try:
        from polypure.evaluation.evaluators import EVALUATORS
        out["evaluators"] = EVALUATORS
    except ImportError:
        pass
    from polypure.data.datasets import DATASETS
    out["datasets"] = DATASETS
    from polypure.dictionaries.kinds import DICTIONARY_KINDS
    out["dictionaries"] = DICTIONARY_KINDS
    return out


def _run(args) -> int:
    from polypure.experiment import Experiment

    if args.command == "run":
        stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
        if stages:
            unknown = [s for s in stages if s not in NAMES]
            if unknown:
                raise ConfigError(f"--stages: unknown stage {unknown[0]!r}; stages: {', '.join(NAMES)}")
    else:
        stages = [args.command]
    overrides = list(args.overrides)
    if args.executor is not None:
        overrides.append(f"executor.kind={args.executor}")
    if args.workers is not None:
        overrides.append(f"executor.workers={args.workers}")
    exp = Experiment(args.config, overrides=overrides, overwrite=args.overwrite, progress=not args.quiet)
    exp.run(stages)
    if not args.quiet:
        print(f"store: {exp.config.store_path}")
        if exp.report_path is not None:
            print(f"report: {exp.report_path}")
    return 0


def _describe_canonizers(registry, broken) -> None:
    """One line per canonizer: the network families and module types it covers."""
    from polypure.attribution.composites import canonizer_families

    names = [n for n in registry.names() if n not in broken]
    width = max(map(len, names), default=0)
    for name in names:
        families = canonizer_families(name)
        if families:
            print(f"  {name.ljust(width)}  {families}")


def _check_rules(args) -> int:
    from polypure.attribution.rule_checks import check_config
    from polypure.config.settings import load_config

    for option in ("samples", "neurons"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise ConfigError(f"--{option}: must be at least 1, not {getattr(args, option)}")
    report = check_config(load_config(args.config, args.overrides), samples=args.samples, neurons=args.neurons,
                          ideal=args.ideal)
    print(report.table())
    for failure in report.failures:
        print(f"polypure: error: {failure}", file=sys.stderr)
    return 0 if report.passed else 1


def split_overrides(argv: list[str]) -> list[str]:
    """Give each ``--set`` value its own ``--set=VALUE`` so that a config named after them stays positional.

    ``--set`` takes several values (``--set topk.k=20 relevance.n_refs=20``); argparse would also swallow a
    config file written after them (``run --set topk.k=20 demo.yaml``). A value is an override while it
    has a ``=``; the first value after ``--set`` always is one, so that ``--set topk`` is reported as a bad
    override rather than as a stray config.
    """
    out: list[str] = []
    taking, first = False, False
    for item in argv:
        if item == "--set":
            # kept as it is until a value follows, so that a bare --set is still argparse's error
            out.append(item)
            taking, first = True, True
            continue
        if taking and not item.startswith("-") and (first or "=" in item):
            if first:
                out[-1] = f"--set={item}"
            else:
                out.append(f"--set={item}")
            first = False
            continue
        taking = False
        out.append(item)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``polypure`` command; returns the exit status."""
    args = build_parser().parse_args(split_overrides(list(sys.argv[1:] if argv is None else argv)))
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="polypure: %(message)s", stream=sys.stderr)
    from polypure.store.write_session import terminate_as_interrupt

    # SIGTERM (a scheduler's stop) ends a run as Ctrl-C does: after the write under way, committed, exit 143
    terminate_as_interrupt()
    try:
        if args.command == "inspect":
            from polypure.store.inspection import describe
            print(describe(args.store, show_config=not args.no_config))
            return 0
        if args.command == "report":
            from polypure.viz.report import write_report
            if args.neurons is not None and args.neurons < 1:
                raise ConfigError(f"--neurons: must be at least 1, not {args.neurons}")
            print(write_report(args.store, out=args.out, max_neurons=args.neurons, view=args.view,
                               progress=not args.quiet, neurons_key="--neurons"))
            return 0
        if args.command == "export":
            from polypure.store.results import export
            for path in export(args.store, args.out, format=args.format, baseline=args.baseline):
                print(path)
            return 0
        if args.command == "compare":
            from polypure.config.paths import require_output_folder
            from polypure.evaluation.store_comparison import compare_stores, write_comparison
            # the folder's kind before the comparison is computed, so that nothing computed is lost
            require_output_folder(args.out, "--out")
            paired = {"auto": None, "paired": True, "unpaired": False}[args.test]
            result = compare_stores(args.stores, metric=args.metric, paired=paired, seed=args.seed)
            for path in write_comparison(result, args.out):
                print(path)
            print(result.summary_line())
            return 0
        if args.command == "demo-train":
            if args.model == "demo_vit":
                from polypure.models.demo_vit import train_demo_vit as train
            else:
                from polypure.models.demo_resnet import train_demo as train
            # options left out keep the training function's own defaults, which the shipped card records
            given = {k: v for k, v in (("epochs", args.epochs), ("per_epoch", args.per_epoch)) if v is not None}
            card = train(args.out, seed=args.seed, progress=not args.quiet, **given)
            print(f"held-out accuracy {card['held_out']['accuracy']:.4f} after {card['seconds']} s")
            return 0
        if args.command == "list":
            for kind, registry in _registries().items():
                if args.kind in (None, kind):
                    # a plugin whose entry point fails to import is listed as such; the other names still work
                    broken = registry.broken()
                    print(f"{kind}: {', '.join(f'{n} (broken)' if n in broken else n for n in registry.names())}")
                    if kind == "canonizers":
                        _describe_canonizers(registry, broken)
                    for message in broken.values():
                        print(f"polypure: warning: {message}", file=sys.stderr)
            return 0
        if args.command == "check-rules":
            return _check_rules(args)
        return _run(args)
    except ConfigError as exc:
        print(f"polypure: config error: {exc}", file=sys.stderr)
        return 2
    except InputError as exc:
        # a store that is missing, torn, newer, locked or made for another run, a plugin that fails on its
        # data: bad input, as a bad config is
        print(f"polypure: error: {exc}", file=sys.stderr)
        return 2
    except PolypureError as exc:
        print(f"polypure: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        from polypure.store.write_session import Terminated

        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"polypure: {what}; finished work is saved in the store, rerun the same command to continue",
              file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except Exception:  # a bug, not a user error: show where
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
