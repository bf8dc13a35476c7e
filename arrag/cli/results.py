"""Result subcommands: the ablation's selection, and the tables and figures rendered from result records."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_select(args: argparse.Namespace) -> None:
    from arrag.select import parse_cell, write_selection

    pinned = parse_cell("_".join(args.pin)) if args.pin else None
    record = write_selection(args.method, args.fid_records, args.out, pinned)
    how = "pinned by the config" if record["pinned"] else f"lowest FID {record['fid']:.3f}"
    print(f"{args.method}: {record['values']} ({how})")


def cmd_tables(args: argparse.Namespace) -> None:
    from arrag.tables import RunSpec, render_tables

    if not args.run_dir.is_dir():
        raise SystemExit(f"tables: no run folder {args.run_dir}; give --run-dir results/<run_name> of a run "
                         "(the workflow writes it: snakemake --configfile config/<name>.yaml)")
    methods = dict(pair.split("=", 1) for pair in args.method)
    run = RunSpec(args.run_dir, args.scale, methods, (tuple(args.daid_lam), tuple(args.daid_tau)),
                  (tuple(args.faid_hops), tuple(args.faid_m)), args.reported)
    render_tables(run, args.out_dir)
    print(f"tables and figures in {args.out_dir} (index: {args.out_dir / 'README.md'})")


def _add_select(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=["daid", "faid"])
    parser.add_argument("--out", required=True, type=Path, help="selection record (JSON) to write")
    parser.add_argument("--pin", action="append", default=[],
                        help="a value pinned by the config instead of selected, e.g. --pin lam0.3 --pin tau1.0")
    parser.add_argument("fid_records", nargs="*", type=Path, help="metrics/mjhq_ablation/<method>/<cell>/fid.json")


def _add_tables(parser: argparse.ArgumentParser) -> None:
    from arrag.tables import REPORTED_DIR

    parser.add_argument("--run-dir", required=True, type=Path, help="run folder (results/<run_name>)")
    parser.add_argument("--out-dir", required=True, type=Path, help="folder for the tables, figures and README.md")
    parser.add_argument("--scale", required=True, choices=["shapes", "paper"])
    parser.add_argument("--method", action="append", default=[], metavar="METHOD=VARIANT",
                        help="a method of the run and the variant of its main-table records (repeat)")
    parser.add_argument("--daid-lam", nargs="*", default=[], help="DAiD ablation grid: lambda values")
    parser.add_argument("--daid-tau", nargs="*", default=[], help="DAiD ablation grid: tau values")
    parser.add_argument("--faid-hops", nargs="*", default=[], help="FAiD ablation grid: hop levels")
    parser.add_argument("--faid-m", nargs="*", default=[], help="FAiD ablation grid: numbers of blenders")
    parser.add_argument("--reported", type=Path, default=REPORTED_DIR, help="the paper's numbers (CSV folder)")



COMMANDS = {
    "select": (cmd_select, "pick ablation values with the lowest FID (or the pinned ones)", _add_select),
    "tables": (cmd_tables, "render Tables 1-4 and Figure 7 from result records", _add_tables),
}
