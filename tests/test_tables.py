"""Tables 1-4 and Figure 7 from result records only, beside the paper's transcribed numbers.

Derived numbers are float arithmetic on the records' (0.625 - 0.5, 11 / 10 - 1): pytest.approx, with its default
1e-6 relative, absorbs their float64 rounding; numbers copied from a record are compared with ==.
"""

import csv
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from arrag import cli
from arrag.tables import (
    BASE_METHOD,
    METHOD_LABELS,
    MISSING,
    OUTPUTS,
    REPORTED_DIR,
    SHAPES_NOTE,
    TABLES,
    RunSpec,
    read_reported,
    render_tables,
)

REPO = Path(__file__).resolve().parent.parent
PAPER_TEXT = REPO.parent / "shared" / "paper" / "AR-RAG-paper.txt"
METHODS = {"vanilla": "default", "racm3": "default", "daid": "selected", "faid": "selected"}
GRIDS = {"daid_grid": (("0.1", "0.3"), ("1.0",)), "faid_grid": (("1", "12"), ("1", "2"))}
PROVENANCE = {"git_commit": "c0ffee", "config_hash": "feedface", "created": "2026-01-01T00:00:00+00:00"}


def write(run: Path, relative: str, record: dict) -> None:
    path = run / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**record, **PROVENANCE}))


def tags(value: float) -> dict:
    return {t: value for t in ("single_object", "two_object", "counting", "colors", "position", "color_attr")}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """Records of vanilla (complete) and DAiD (GenEval, MJHQ FID, timings) and two of four FAiD ablation cells."""
    run = tmp_path / "results" / "demo"
    write(run, "metrics/geneval/vanilla/default/geneval.json", {"geneval": 0.5, "geneval_per_tag": tags(0.5)})
    write(run, "metrics/geneval/daid/selected/geneval.json", {"geneval": 0.625, "geneval_per_tag": tags(0.625)})
    write(run, "metrics/dpg/vanilla/default/dpg.json",
          {"dpg": 60.0, "dpg_l1": {k: 60.0 for k in ("global", "entity", "attribute", "relation", "other")},
           "settings": {"official_quirks": False}, "other_mode": {"official_quirks": True, "dpg": 57.125}})
    for metric, value in (("fid", 40.0), ("cmmd", 1.5), ("fwd", 3.0)):
        write(run, f"metrics/mjhq/vanilla/default/{metric}.json", {metric: value})
    write(run, "metrics/mjhq/daid/selected/fid.json", {"fid": 30.0})
    for bench, (vanilla, daid) in {"geneval": (10.0, 11.0), "dpg": (20.0, 22.0), "mjhq": (10.0, 11.0)}.items():
        write(run, f"generated/{bench}/vanilla/default/record.json",
              {"generation_seconds": vanilla, "images_timed": 40, "device": "cpu"})
        write(run, f"generated/{bench}/daid/selected/record.json",
              {"generation_seconds": daid, "images_timed": 40, "device": "cpu"})
    write(run, "metrics/mjhq_ablation/daid/lam0.1_tau1.0/fid.json", {"fid": 31.0})
    write(run, "metrics/mjhq_ablation/faid/hops12_m2/fid.json", {"fid": 28.5})
    write(run, "selection/daid.json", {"variant": "lam0.1_tau1.0", "lam": 0.1, "tau": 1.0})
    return run


def rows_of(out: Path, name: str) -> list[dict]:
    with open(out / f"{name}.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def find(rows: list[dict], system: str, source: str) -> dict:
    return next(r for r in rows if r["system"] == system and r["source"] == source)


# ---------------------------------------------------------------- the transcribed numbers
def test_reported_tables_name_their_columns_and_harness_rows():
    for spec in TABLES:
        rows = read_reported(spec.name)
        assert rows, spec.name
        for row in rows:
            assert {c.key for c in spec.columns} <= set(row), spec.name
            assert row["harness"] in ("yes", "no")
            assert (row["harness"] == "yes") == bool(row["harness_method"]), row["method"]
            if row["harness_method"]:
                assert row["harness_method"] in METHOD_LABELS
    harness = {row["harness_method"] for row in read_reported("table3_mjhq") if row["harness"] == "yes"}
    assert harness == set(METHOD_LABELS)  # Table 3 has every system the harness runs, Show-o included


def test_printed_changes_agree_with_the_transcribed_numbers():
    """The '(+0.01)'-style changes the paper prints are its overall minus its Janus-Pro row: a transcription check."""
    # Two-decimal numbers: a last-digit transcription error moves a difference by 0.01. The printed changes are
    # the differences of the printed overalls (measured equal up to float rounding): 0.006 catches such an error.
    # The printed overheads are the ratios of the printed seconds per image rounded to two decimals, so within
    # 0.005 of them (measured 0.002 and 0.004, which a last-digit error would push past 0.005).
    for name in ("table1_geneval", "table2_dpg"):
        rows = read_reported(name)
        vanilla = float(next(r for r in rows if r["harness_method"] == "vanilla")["overall"])
        for row in rows:
            if row["overall_change"]:
                assert float(row["overall"]) - vanilla == pytest.approx(float(row["overall_change"]), abs=0.006)
    rows = read_reported("table4_time")
    vanilla = float(next(r for r in rows if r["harness_method"] == "vanilla")["seconds_per_image"])
    for row in rows:
        if row["overhead_percent"]:
            overhead = (float(row["seconds_per_image"]) / vanilla - 1) * 100
            assert overhead == pytest.approx(float(row["overhead_percent"]), abs=0.005)


def test_transcribed_rows_appear_in_the_paper_text():
    if not PAPER_TEXT.is_file():
        pytest.skip(f"paper text not found at {PAPER_TEXT}")
    lines = [line for line in PAPER_TEXT.read_text().splitlines() if line.count("|") >= 3]
    for spec in TABLES:
        keys = ([] if spec.name == "table4_time" else ["params"]) + [c.key for c in spec.columns
                                                                     if c.key != "overhead_percent"]
        for row in read_reported(spec.name):
            printed = " | ".join(row[k] or "-" for k in keys)
            assert any(printed in line for line in lines), (spec.name, row["method"], printed)


# ---------------------------------------------------------------- rendering
def test_shapes_tables_from_records(run_dir, tmp_path):
    out = tmp_path / "tables"
    render_tables(RunSpec(run_dir, "shapes", METHODS, **GRIDS), out)
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUTS, "README.md"])
    table1 = rows_of(out, "table1_geneval")
    vanilla = find(table1, "Janus-Pro", "this run (Shapes world)")
    daid = find(table1, "Janus-Pro + DAiD (ours)", "this run (Shapes world)")
    assert float(vanilla["overall"]) == 0.5 and float(daid["overall"]) == 0.625
    assert float(daid["vs_vanilla"]) == pytest.approx(0.125)
    assert float(find(table1, "Janus-Pro + DAiD (ours)", "paper")["vs_vanilla"]) == pytest.approx(0.01)
    assert "selected: variant=lam0.1_tau1.0, lam=0.1, tau=1.0" in daid["note"]
    racm3 = find(table1, "Janus-Pro + RA-CM3", "this run (Shapes world)")
    assert {racm3[c.key] for c in TABLES[0].columns} == {MISSING} and racm3["vs_vanilla"] == MISSING
    assert not [r for r in table1 if r["source"].startswith("difference")]  # not comparable with the paper
    assert find(table1, "PixArt-alpha", "paper (not run here)")["overall"] == "0.48"
    assert find(table1, "Transfusion", "paper (not run here)")["counting"] == "-"
    showo = find(table1, "Show-o", "this run (Shapes world)")
    assert showo["note"] == "showo is not among this run's methods"
    # Table 2 says which DPG-Bench scoring it shows and gives the other's overall (published tables: the quirks)
    dpg = find(rows_of(out, "table2_dpg"), "Janus-Pro", "this run (Shapes world)")
    assert float(dpg["overall"]) == 60.0 and dpg["note"] == "quirks corrected; with the official quirks: overall 57.12"
    markdown = (out / "table1_geneval.md").read_text()
    assert SHAPES_NOTE in markdown and "| Janus-Pro |  | this run (Shapes world) | 0.50 |" in markdown
    assert "\\textit{missing}" in (out / "table1_geneval.tex").read_text()


def test_missing_results_never_show_a_number(tmp_path):
    out = tmp_path / "tables"
    render_tables(RunSpec(tmp_path / "empty", "paper", METHODS, **GRIDS), out)
    for spec in TABLES:
        for row in rows_of(out, spec.name):
            if not row["source"].startswith("paper"):
                assert {row[c.key] for c in spec.columns} <= {MISSING, ""}, (spec.name, row)
    assert {r["fid"] for r in rows_of(out, "figure7_ablation")} == {MISSING}
    readme = (out / "README.md").read_text()
    assert "`metrics/geneval/vanilla/default/geneval.json`" in readme


def test_paper_scale_rows_stand_beside_the_paper_with_the_difference(run_dir, tmp_path):
    out = tmp_path / "tables"
    render_tables(RunSpec(run_dir, "paper", METHODS, **GRIDS), out)
    table3 = rows_of(out, "table3_mjhq")
    difference = find(table3, "Janus-Pro", "difference (this run - paper)")
    assert float(difference["fid"]) == pytest.approx(40.0 - 14.33)
    assert float(find(table3, "Janus-Pro + DAiD (ours)", "this run")["vs_vanilla"]) == pytest.approx(-10.0)
    assert find(table3, "Janus-Pro + DAiD (ours)", "difference (this run - paper)")["cmmd"] == MISSING
    assert [(r["source"], r["params"]) for r in table3 if r["system"] == "Janus-Pro"] == [
        ("paper", "1.0B"), ("this run", "1.0B"), ("difference (this run - paper)", "")]
    assert SHAPES_NOTE not in (out / "README.md").read_text()


def test_table4_timings_and_overhead_from_generation_records(run_dir, tmp_path):
    out = tmp_path / "tables"
    render_tables(RunSpec(run_dir, "shapes", METHODS, **GRIDS), out)
    table4 = rows_of(out, "table4_time")
    vanilla = find(table4, "Janus-Pro", "this run (Shapes world)")
    daid = find(table4, "Janus-Pro + DAiD", "this run (Shapes world)")
    assert float(vanilla["total_seconds"]) == 40.0 and float(vanilla["seconds_per_image"]) == pytest.approx(1 / 3)
    assert float(daid["overhead_percent"]) == pytest.approx(10.0)
    assert vanilla["overhead_percent"] == "" and "120 images timed on cpu" in vanilla["note"]
    assert find(table4, "Janus-Pro + DAiD", "paper")["overhead_percent"] == "0.22"
    racm3 = find(table4, "Janus-Pro + RA-CM3", "this run (Shapes world)")  # not in the paper's Table 4
    assert racm3["group"] == "Not in the paper's table" and racm3["total_seconds"] == MISSING


def test_table4_show_o_rows_time_the_mjhq_style_benchmark(run_dir, tmp_path):
    for method, variant, seconds in (("showo", "default", 20.0), ("showo_daid", "lam0.1_tau0.5", 25.0)):
        write(run_dir, f"generated/mjhq/{method}/{variant}/record.json",
              {"generation_seconds": seconds, "images_timed": 50, "device": "cpu"})
    methods = {**METHODS, "showo": "default", "showo_daid": "lam0.1_tau0.5"}
    render_tables(RunSpec(run_dir, "shapes", methods, **GRIDS), tmp_path / "tables")
    table4 = rows_of(tmp_path / "tables", "table4_time")
    showo, daid = (find(table4, name, "this run (Shapes world)") for name in ("Show-o", "Show-o + DAiD"))
    assert float(showo["seconds_per_image"]) == pytest.approx(0.4) and "(MJHQ-style only)" in showo["note"]
    assert float(daid["overhead_percent"]) == pytest.approx(25.0)


def test_figure7_heatmaps_and_provenance(run_dir, tmp_path):
    out = tmp_path / "tables"
    render_tables(RunSpec(run_dir, "shapes", METHODS, **GRIDS), out)
    cells = {(r["method"], r["row_value"], r["column_value"]): r["fid"] for r in rows_of(out, "figure7_ablation")}
    assert cells == {("daid", "0.1", "1.0"): "31.0", ("daid", "0.3", "1.0"): MISSING, ("faid", "1", "1"): MISSING,
                     ("faid", "1", "2"): MISSING, ("faid", "12", "1"): MISSING, ("faid", "12", "2"): "28.5"}
    for name in ("figure7_daid.png", "figure7_faid.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 200
    assert "| faid | hops | 12 |" in (out / "figure7_ablation.md").read_text()
    provenance = rows_of(out, "provenance")
    fid = next(r for r in provenance if r["output"] == "figure7_ablation" and r["row"] == "faid hops12_m2")
    record = run_dir / fid["source"]
    assert fid["source_sha256"] == hashlib.sha256(record.read_bytes()).hexdigest()
    assert (fid["git_commit"], fid["config_hash"]) == ("c0ffee", "feedface")
    computed = [r for r in provenance if not r["source"].startswith("results/reported/")]
    assert {r["source"] for r in computed} >= {"metrics/geneval/daid/selected/geneval.json",
                                              "generated/dpg/vanilla/default/record.json"}


def test_a_corrupt_record_is_named(run_dir, tmp_path):
    (run_dir / "metrics/dpg/vanilla/default/dpg.json").write_text('{"dpg": 6')
    with pytest.raises(ValueError, match=r"metrics/dpg/vanilla/default/dpg.json is not valid JSON"):
        render_tables(RunSpec(run_dir, "shapes", METHODS, **GRIDS), tmp_path / "tables")


def test_the_tables_command(run_dir, tmp_path):
    out = tmp_path / "tables"
    code = cli.main(["tables", "--run-dir", str(run_dir), "--out-dir", str(out), "--scale", "shapes",
                     "--method=vanilla=default", "--method=daid=selected", "--daid-lam", "0.1", "--daid-tau", "1.0",
                     "--faid-hops", "--faid-m", "--reported", str(REPORTED_DIR)])
    assert code == 0
    assert "| Janus-Pro + DAiD (ours) |  | this run (Shapes world) | 0.62 |" in (out / "README.md").read_text()
    assert find(rows_of(out, "table1_geneval"), "Janus-Pro + RA-CM3", "this run (Shapes world)")["note"] == (
        "racm3 is not among this run's methods")
    assert set(BASE_METHOD.values()) <= set(METHOD_LABELS)


# ---------------------------------------------------------------- the workflow's report
def test_snakemake_report_builds(run_dir, tmp_path):
    """`snakemake --report` on a small run: the CI config's tables target, its flagged outputs in place."""
    workdir = tmp_path / "work"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    base = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "results/ci/tables/README.md",
            "--configfile", str(REPO / "config" / "ci.yaml"), "--directory", str(workdir), "--cores", "1"]
    dry = subprocess.run([*base, "-n"], env=env, capture_output=True, text=True, check=True)
    for grid in sorted(set(re.findall(r"results/ci/generated/\S+/sample_grid\.png", dry.stdout))):
        (workdir / grid).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 16), "white").save(workdir / grid)
    render_tables(RunSpec(run_dir, "shapes", METHODS, **GRIDS), workdir / "results" / "ci" / "tables")
    report = tmp_path / "report.html"
    result = subprocess.run([*base, "--report", str(report)], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    html = report.read_text()
    for expected in ("Table 1: GenEval", "figure7_daid.png", "provenance.csv", "sample_grid.png", "Sample grids"):
        assert expected in html, expected
