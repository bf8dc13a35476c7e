"""`python -m evaluators <metric> ... [--json] [--out FILE]`: one JSON result record per run.

Each metric module provides ``add_arguments(parser)`` and ``run(args) -> dict`` returning the
keyword arguments of :func:`evaluators.record.make_record` except ``seed`` and ``config_hash``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from evaluators.io import write_json_atomic
from evaluators.record import make_record

METRICS = {
    "fid": ("evaluators.fid", "Frechet Inception Distance, clean-fid 'clean' mode"),
    "cmmd": ("evaluators.cmmd", "CLIP maximum mean discrepancy, as google-research/cmmd"),
    "fwd": ("evaluators.fwd", "Frechet Wavelet Distance, as pytorchfwd 1.0.1"),
    "geneval": ("evaluators.geneval", "GenEval scoring of a generated folder"),
    "dpg": ("evaluators.dpg", "DPG-Bench scoring of a generated folder"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluators", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="metric", required=True, metavar="METRIC")
    for name, (module_name, help_text) in METRICS.items():
        metric_parser = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            metric_parser.set_defaults(missing=f"not implemented yet: evaluator {name}")
            continue
        module.add_arguments(metric_parser)
        metric_parser.add_argument("--json", action="store_true", help="print the record to stdout")
        metric_parser.add_argument("--out", help="write the record to this file (atomically)")
        metric_parser.add_argument("--seed", type=int, help="seed to record (generation seed)")
        metric_parser.add_argument("--config-hash", help="config hash to record")
        metric_parser.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "missing", None):
        print(args.missing, file=sys.stderr)
        return 2
    if not (args.json or args.out):
        args.json = True
    record = make_record(args.metric, **args.module.run(args), seed=args.seed, config_hash=args.config_hash)
    if args.out:
        write_json_atomic(args.out, record)
    if args.json:
        print(json.dumps(record, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
