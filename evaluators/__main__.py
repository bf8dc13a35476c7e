"""`python -m evaluators <metric> ... [--json] [--out FILE]`: one JSON result record per run.

Each metric module provides ``add_arguments(parser)`` and ``run(args) -> dict`` returning the
keyword arguments of :func:`evaluators.record.make_record` except ``seed`` and ``config_hash``.
Only the chosen metric's module is imported, so GenEval and DPG-Bench run in their own environments
(mmdet, modelscope) without the packages the other metrics need.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from evaluators.io import write_json_atomic
from evaluators.record import generation_provenance, make_record

METRICS = {
    "fid": ("evaluators.fid", "Frechet Inception Distance, clean-fid 'clean' mode"),
    "cmmd": ("evaluators.cmmd", "CLIP maximum mean discrepancy, as google-research/cmmd"),
    "fwd": ("evaluators.fwd", "Frechet Wavelet Distance, as pytorchfwd 1.0.1"),
    "geneval": ("evaluators.geneval", "GenEval scoring of a generated folder"),
    "dpg": ("evaluators.dpg", "DPG-Bench scoring of a generated folder"),
}


def metric_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one metric, built from its module."""
    module_name, help_text = METRICS[name]
    parser = argparse.ArgumentParser(prog=f"python -m evaluators {name}", description=help_text)
    module = importlib.import_module(module_name)
    module.add_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the record to stdout (default without --out)")
    parser.add_argument("--out", help="write the record to this file (atomically)")
    parser.add_argument("--seed", type=int, help="seed to record (generation seed)")
    parser.add_argument("--config-hash", default=os.environ.get("ARRAG_CONFIG_HASH"),
                        help="config hash to record (default: $ARRAG_CONFIG_HASH, which the workflow sets)")
    parser.add_argument("--generation-record", help="the scored images' generation record (arrag generate): its "
                        "precision, machine, model and commit go into the result record")
    parser.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in METRICS:
        usage = "\n".join(f"  {name:<8} {help_text}" for name, (_, help_text) in METRICS.items())
        print(f"usage: python -m evaluators METRIC ...   (METRIC --help for its options)\n\nmetrics:\n{usage}",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    args = metric_parser(argv[0]).parse_args(argv[1:])
    if not (args.json or args.out):
        args.json = True
    record = make_record(argv[0], **args.module.run(args), seed=args.seed, config_hash=args.config_hash,
                         generation=generation_provenance(args.generation_record))
    if args.out:
        write_json_atomic(args.out, record)
    if args.json:
        print(json.dumps(record, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
