"""Tables 1-4 and Figure 7 of the paper, rendered from result records only, beside the paper's numbers.

Inputs, all read-only:
- the paper's reported numbers, `results/reported/table*.csv` (transcribed from the paper, one file per table;
  `harness_method` names the result records of each row the harness runs);
- result records of a run: `metrics/<bench>/<method>/<variant>/<metric>.json` (Tables 1-3, Figure 7) and
  generation records `generated/<bench>/<method>/<variant>/record.json` (Table 4 timings).

Every reproduced row stands under the paper's row of the same system. At paper scale a third row gives the
difference (this run - paper). In the Shapes world the numbers are not comparable in absolute value with the
paper's, so there is no difference row; the "vs. vanilla" column shows the direction of each method's effect
in both. A result whose record does not exist is shown as "missing", never as a number; "-" is a number the
paper does not give. Outputs (Markdown, LaTeX, CSV, PNG; `OUTPUTS`) are written atomically into one folder
whose `README.md` is the index; `provenance.csv` names the record (path, sha256, git commit, config hash)
behind every number.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from evaluators.io import write_bytes_atomic

REPORTED_DIR = Path(__file__).resolve().parent.parent / "results" / "reported"
TIMED_BENCHMARKS = ("geneval", "dpg", "mjhq")
MISSING = "missing"  # a result of this run whose record does not exist
NOT_REPORTED = "-"  # a number the paper does not give
NOT_APPLICABLE = ""

# Rows of this run for methods that are not in a paper table, and the vanilla row each method is compared with.
METHOD_LABELS = {"vanilla": "Janus-Pro", "racm3": "Janus-Pro + RA-CM3", "daid": "Janus-Pro + DAiD",
                 "faid": "Janus-Pro + FAiD", "showo": "Show-o", "showo_daid": "Show-o + DAiD",
                 "showo_faid": "Show-o + FAiD"}
BASE_METHOD = {"racm3": "vanilla", "daid": "vanilla", "faid": "vanilla", "showo_daid": "showo",
               "showo_faid": "showo"}
SHAPES_NOTE = ("Shapes-world numbers: a procedurally rendered miniature of the paper's setting with tiny models "
               "trained on CPU. They are not comparable in absolute value with the paper's; the paper's rows "
               "are shown for the direction of each effect (column 'vs. vanilla').")


@dataclass(frozen=True)
class Column:
    """One column of a table: its key in the CSVs, the paper's label, where this run's value comes from."""

    key: str
    label: str
    metric: str = ""  # record file metrics/<bench>/<method>/<variant>/<metric>.json ("" for Table 4)
    path: tuple[str, ...] = ()  # keys of the value inside the record
    digits: int = 2


@dataclass(frozen=True)
class TableSpec:
    name: str  # file stem of the reported CSV and of the outputs
    title: str
    bench: str  # folder under metrics/ ("" for Table 4, which reads the generation records)
    columns: tuple[Column, ...]
    effect: str = ""  # column whose change against the vanilla row is shown as "vs. vanilla"
    params: bool = True  # the paper's table has a parameter-count column


TABLES = (
    TableSpec("table1_geneval", "Table 1: GenEval", "geneval", (
        Column("single_object", "Single Obj.", "geneval", ("geneval_per_tag", "single_object")),
        Column("two_object", "Two Obj.", "geneval", ("geneval_per_tag", "two_object")),
        Column("counting", "Counting", "geneval", ("geneval_per_tag", "counting")),
        Column("colors", "Colors", "geneval", ("geneval_per_tag", "colors")),
        Column("position", "Position", "geneval", ("geneval_per_tag", "position")),
        Column("color_attr", "Color Attri.", "geneval", ("geneval_per_tag", "color_attr")),
        Column("overall", "Overall", "geneval", ("geneval",)),
    ), effect="overall"),
    TableSpec("table2_dpg", "Table 2: DPG-Bench", "dpg", (
        Column("global", "Global", "dpg", ("dpg_l1", "global")),
        Column("entity", "Entity", "dpg", ("dpg_l1", "entity")),
        Column("attribute", "Attribute", "dpg", ("dpg_l1", "attribute")),
        Column("relation", "Relation", "dpg", ("dpg_l1", "relation")),
        Column("other", "Other", "dpg", ("dpg_l1", "other")),
        Column("overall", "Overall", "dpg", ("dpg",)),
    ), effect="overall"),
    TableSpec("table3_mjhq", "Table 3: MJHQ-30K", "mjhq", (
        Column("cmmd", "CMMD", "cmmd", ("cmmd",), digits=3),
        Column("fid", "FID", "fid", ("fid",)),
        Column("fwd", "FWD", "fwd", ("fwd",)),
    ), effect="fid"),
    TableSpec("table4_time", "Table 4: inference time", "", (
        Column("total_seconds", "Total (s)"),
        Column("seconds_per_image", "Average (s)"),
        Column("overhead_percent", "Overhead (%)"),
    ), params=False),
)
FIGURE7 = "figure7_ablation"
PAPER_PARAMETERS = {"lam": "lambda"}  # figure7_ablation.csv parameter -> axis name of the heatmap
OUTPUTS = tuple(f"{t.name}.{ext}" for t in TABLES for ext in ("md", "tex", "csv")) + tuple(
    f"{FIGURE7}.{ext}" for ext in ("md", "tex", "csv")) + ("figure7_daid.png", "figure7_faid.png", "provenance.csv")


@dataclass(frozen=True)
class RunSpec:
    """What the tables are rendered from: a run folder, its scale, its methods and ablation grids."""

    run_dir: Path
    scale: str  # "shapes" or "paper"
    methods: dict[str, str]  # method -> variant of its main-table records ("default" / "selected")
    daid_grid: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # (lambda values, tau values) as in variants
    faid_grid: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # (hops values, m values)
    reported_dir: Path = REPORTED_DIR

    @property
    def run_label(self) -> str:
        return "this run (Shapes world)" if self.scale == "shapes" else "this run"


@dataclass
class Row:
    """One rendered row; a value is a number or one of MISSING, NOT_REPORTED, NOT_APPLICABLE.

    `printed` holds the paper's text of its numbers, which paper rows show as printed."""

    group: str
    system: str
    params: str
    source: str
    values: dict[str, float | str]
    note: str = ""
    printed: dict[str, str] = field(default_factory=dict)


@dataclass
class Provenance:
    """Where every number of the outputs comes from, one line per (output, row, column)."""

    rows: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # records that were looked for and do not exist

    def add(self, output: str, row: str, column: str, value, source: str, record: dict | None = None,
            sha256: str = "") -> None:
        record = record or {}
        self.rows.append({"output": output, "row": row, "column": column, "value": value, "source": source,
                          "source_sha256": sha256, "git_commit": record.get("git_commit") or "",
                          "config_hash": record.get("config_hash") or "", "created": record.get("created") or ""})


class Records:
    """Result records of one run, read once each; absent ones are noted as missing."""

    def __init__(self, run_dir: Path, provenance: Provenance):
        self.run_dir = run_dir
        self.provenance = provenance
        self._cache: dict[str, tuple[dict, str] | None] = {}

    def get(self, relative: str, required: bool = True) -> tuple[dict, str] | None:
        """(record, sha256 of its file), or None when the file does not exist (listed as missing if required)."""
        if relative not in self._cache:
            path = self.run_dir / relative
            if path.is_file():
                data = path.read_bytes()
                try:
                    record = json.loads(data)
                except json.JSONDecodeError as err:
                    raise ValueError(f"result record {path} is not valid JSON: {err}") from err
                self._cache[relative] = (record, hashlib.sha256(data).hexdigest())
            else:
                self._cache[relative] = None
        if self._cache[relative] is None and required and relative not in self.provenance.missing:
            self.provenance.missing.append(relative)
        return self._cache[relative]


def read_reported(name: str, reported_dir: Path = REPORTED_DIR) -> list[dict]:
    path = reported_dir / f"{name}.csv"
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def reported_value(text: str) -> float | str:
    return float(text) if text.strip() else NOT_REPORTED


def system_name(row: dict) -> str:
    return f"{row['base']} {row['method']}" if row["base"] else row["method"]


def lookup(record: dict, path: tuple[str, ...], where: str) -> float:
    value = record
    for key in path:
        if not isinstance(value, dict) or key not in value:
            raise ValueError(f"result record {where} has no field {'.'.join(path)}")
        value = value[key]
    return float(value)


def run_values(spec: TableSpec, method: str, variant: str, records: Records, provenance: Provenance,
               row_label: str) -> tuple[dict[str, float | str], str]:
    """This run's values of a table row (MISSING where a record is absent) and a note on them."""
    if not spec.bench:
        return timing_values(spec, method, variant, records, provenance, row_label)
    values: dict[str, float | str] = {}
    for column in spec.columns:
        relative = f"metrics/{spec.bench}/{method}/{variant}/{column.metric}.json"
        found = records.get(relative)
        if found is None:
            values[column.key] = MISSING
            continue
        values[column.key] = lookup(found[0], column.path, relative)
        provenance.add(spec.name, row_label, column.key, values[column.key], relative, found[0], found[1])
    dpg = records.get(f"metrics/dpg/{method}/{variant}/dpg.json") if spec.bench == "dpg" else None
    return values, dpg_mode_note(dpg[0]) if dpg else ""


def dpg_mode_note(record: dict) -> str:
    """Which DPG-Bench scoring a row shows, the official script's (quirks on) or the corrected one, and the
    overall score of the other (the evaluator writes both from the same answers)."""
    quirks = record.get("settings", {}).get("official_quirks")
    if quirks is None:  # a record that does not say
        return ""
    other = record.get("other_mode", {}).get("dpg")
    shown = "official script's quirks" if quirks else "quirks corrected"
    if other is None:
        return shown
    return f"{shown}; {'corrected' if quirks else 'with the official quirks'}: overall {other:.2f}"


def timing_values(spec: TableSpec, method: str, variant: str, records: Records, provenance: Provenance,
                  row_label: str) -> tuple[dict[str, float | str], str]:
    """Table 4: seconds spent generating the images of GenEval, DPG-Bench and MJHQ (all three records; the Show-o
    rows, which generate the MJHQ-style benchmark only, from that one, so they compare among themselves)."""
    benchmarks = ("mjhq",) if method.startswith("showo") else TIMED_BENCHMARKS
    found = {b: records.get(f"generated/{b}/{method}/{variant}/record.json") for b in benchmarks}
    values: dict[str, float | str] = {c.key: MISSING for c in spec.columns}
    if any(v is None for v in found.values()):
        return values, ""
    seconds = sum(r["generation_seconds"] for r, _ in found.values())
    images = sum(r["images_timed"] for r, _ in found.values())
    devices = sorted({str(r.get("device")) for r, _ in found.values()})
    if images == 0:
        return values, "the generation records hold no timed image"
    values.update({"total_seconds": seconds, "seconds_per_image": seconds / images})
    for bench, (record, sha) in found.items():
        provenance.add(spec.name, row_label, "total_seconds, seconds_per_image",
                       record["generation_seconds"], f"generated/{bench}/{method}/{variant}/record.json", record, sha)
    only = " (MJHQ-style only)" if len(benchmarks) == 1 else ""
    return values, f"{images} images timed on {', '.join(devices)}{only}"


def with_effects(spec: TableSpec, rows: list[tuple[Row, str]]) -> None:
    """Fill 'vs. vanilla' (Tables 1-3) or a missing overhead (Table 4) of each row against its vanilla row.

    `rows` pairs each row with its harness method; a row's vanilla row is the row of the same source whose
    method is BASE_METHOD[method] (the paper's "+ DAiD" row against the paper's Janus-Pro row, this run's
    DAiD row against this run's vanilla row). Numbers the paper prints are kept."""
    by_key = {(row.source, method): row for row, method in rows if method}
    for row, method in rows:
        base = by_key.get((row.source, BASE_METHOD.get(method, "")))
        if spec.effect:
            row.values["vs_vanilla"] = change(row.values[spec.effect], base.values[spec.effect] if base else None,
                                              relative=False)
        elif not isinstance(row.values["overhead_percent"], float):
            row.values["overhead_percent"] = change(row.values["seconds_per_image"],
                                                    base.values["seconds_per_image"] if base else None,
                                                    relative=True)


def change(value, base, relative: bool) -> float | str:
    """value - base (or the relative change in %), MISSING when either is missing, blank without a base."""
    if base is None:
        return NOT_APPLICABLE
    if value == MISSING or base == MISSING:
        return MISSING
    if not isinstance(value, float) or not isinstance(base, float):
        return NOT_REPORTED
    return (value / base - 1) * 100 if relative else value - base


def difference(run: Row, paper: Row, keys: list[str]) -> Row:
    values: dict[str, float | str] = {}
    for key in keys:
        a, b = run.values.get(key, NOT_APPLICABLE), paper.values.get(key, NOT_APPLICABLE)
        if a == MISSING:
            values[key] = MISSING
        elif isinstance(a, float) and isinstance(b, float):
            values[key] = a - b
        else:
            values[key] = NOT_REPORTED if b == NOT_REPORTED else NOT_APPLICABLE
    return Row(paper.group, paper.system, "", "difference (this run - paper)", values)


def build_table(spec: TableSpec, run: RunSpec, records: Records, provenance: Provenance) -> list[Row]:
    """The paper's rows in the paper's order, each harness row followed by this run's (and the difference);
    then this run's rows of methods the paper's table does not have."""
    keyed: list[tuple[Row, str]] = []
    paper_of: dict[int, Row] = {}  # index of a run row in `keyed` -> its paper row (paper scale)
    for entry in read_reported(spec.name, run.reported_dir):
        method = entry["harness_method"] if entry["harness"] == "yes" else ""
        system = system_name(entry)
        values = {c.key: reported_value(entry.get(c.key, "")) for c in spec.columns}
        paper = Row(entry["group"], system, entry.get("params", ""), "paper" if method else "paper (not run here)",
                    values, entry["note"], {c.key: entry[c.key] for c in spec.columns if entry.get(c.key)})
        for column in spec.columns:
            provenance.add(spec.name, f"{system} [paper]", column.key, values[column.key],
                           f"results/reported/{spec.name}.csv")
        keyed.append((paper, method))
        if method:
            keyed.append((run_row(spec, run, entry["group"], system, paper.params, method, records, provenance),
                          method))
            if run.scale == "paper":
                paper_of[len(keyed) - 1] = paper
    in_paper = {method for _, method in keyed}
    for method in run.methods:
        if method not in in_paper:
            row = run_row(spec, run, "Not in the paper's table", METHOD_LABELS.get(method, method), "", method,
                          records, provenance)
            keyed.append((row, method))
    with_effects(spec, keyed)
    keys = [c.key for c in spec.columns] + (["vs_vanilla"] if spec.effect else [])
    rows = []
    for index, (row, _) in enumerate(keyed):
        rows.append(row)
        if index in paper_of:
            rows.append(difference(row, paper_of[index], keys))
    return rows


def run_row(spec: TableSpec, run: RunSpec, group: str, system: str, params: str, method: str, records: Records,
            provenance: Provenance) -> Row:
    """This run's row of one method (all MISSING when the method is not among the run's methods). The paper's
    parameter count holds for this run's models at paper scale only."""
    label = f"{system} [{run.run_label}]"
    params = params if run.scale == "paper" else ""
    if method not in run.methods:
        values: dict[str, float | str] = {c.key: MISSING for c in spec.columns}
        return Row(group, system, params, run.run_label, values, f"{method} is not among this run's methods")
    variant = run.methods[method]
    values, note = run_values(spec, method, variant, records, provenance, label)
    selection = records.get(f"selection/{method}.json", required=False) if variant == "selected" else None
    if selection is not None:
        chosen = ", ".join(f"{k}={v}" for k, v in selection[0].items() if k in ("variant", "lam", "tau", "hops", "m"))
        note = "; ".join(filter(None, [f"selected: {chosen}" if chosen else "", note]))
    return Row(group, system, params, run.run_label, values, note)


# ---------------------------------------------------------------- Figure 7: ablation heatmaps
@dataclass(frozen=True)
class Ablation:
    """One heatmap of Figure 7: FID on the ablation subset over a grid of two hyperparameters."""

    method: str
    title: str
    row_name: str
    column_name: str
    row_values: tuple[str, ...]
    column_values: tuple[str, ...]
    variant_format: str  # e.g. "lam{row}_tau{column}", the variant folders of generate.smk

    def variant(self, row: str, column: str) -> str:
        return self.variant_format.format(row=row, column=column)


def ablations(run: RunSpec) -> tuple[Ablation, Ablation]:
    return (Ablation("daid", "DAiD", "lambda", "tau", *run.daid_grid, "lam{row}_tau{column}"),
            Ablation("faid", "FAiD", "hops", "m", *run.faid_grid, "hops{row}_m{column}"))


def ablation_grid(ablation: Ablation, records: Records, provenance: Provenance) -> list[list[float | str]]:
    """FID per (row value, column value); MISSING where the record does not exist."""
    grid = []
    for row in ablation.row_values:
        cells: list[float | str] = []
        for column in ablation.column_values:
            relative = f"metrics/mjhq_ablation/{ablation.method}/{ablation.variant(row, column)}/fid.json"
            found = records.get(relative)
            if found is None:
                cells.append(MISSING)
                continue
            cells.append(lookup(found[0], ("fid",), relative))
            provenance.add(FIGURE7, f"{ablation.method} {ablation.variant(row, column)}", "fid", cells[-1], relative,
                           found[0], found[1])
        grid.append(cells)
    return grid


def heatmap_png(ablation: Ablation, grid: list[list[float | str]], run: RunSpec, paper_choice: dict[str, str]) -> bytes:
    """The heatmap as PNG bytes: FID in each cell, 'missing' cells grey, the lowest FID outlined, and the values
    the paper kept (`paper_choice`: parameter name -> value) marked on the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([[v if isinstance(v, float) else np.nan for v in row] for row in grid], dtype=float)
    rows, columns = max(len(ablation.row_values), 1), max(len(ablation.column_values), 1)
    figure, axes = plt.subplots(figsize=(max(1.3 * columns + 2.2, 5.0), 0.9 * rows + 1.8))
    suffix = "\n[Shapes world: not comparable in absolute value with the paper]" if run.scale == "shapes" else ""
    axes.set_title(f"Figure 7 ({ablation.title}): FID on the ablation subset{suffix}", fontsize=9)
    if values.size == 0:
        axes.text(0.5, 0.5, "no ablation grid configured", ha="center", va="center")
        axes.set_axis_off()
    else:
        axes.set_facecolor("#d9d9d9")
        image = axes.imshow(np.ma.masked_invalid(values), cmap="viridis_r", aspect="auto")
        if np.isfinite(values).any():
            figure.colorbar(image, ax=axes, label="FID (lower is better)")
            best = np.unravel_index(np.nanargmin(values), values.shape)
            axes.add_patch(plt.Rectangle((best[1] - 0.5, best[0] - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
        low, high = np.nanmin(values, initial=np.inf), np.nanmax(values, initial=-np.inf)
        for (i, j), value in np.ndenumerate(values):
            bright = np.isnan(value) or (value - low) <= 0.5 * (high - low)  # viridis_r is light at low FID
            axes.text(j, i, MISSING if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=8,
                      color="black" if bright else "white")

        def ticks(name: str, values_: tuple[str, ...]) -> list[str]:
            return [f"{v}\n(paper)" if paper_choice.get(name) == v else v for v in values_]

        axes.set_xticks(range(len(ablation.column_values)), ticks(ablation.column_name, ablation.column_values))
        axes.set_yticks(range(len(ablation.row_values)), ticks(ablation.row_name, ablation.row_values))
        axes.set_xlabel(ablation.column_name)
        axes.set_ylabel(ablation.row_name)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


# ---------------------------------------------------------------- rendering
def fmt(value: float | str, digits: int, signed: bool = False) -> str:
    if isinstance(value, float):
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return value


def header(spec: TableSpec) -> list[str]:
    effect = [f"vs. vanilla ({next(c.label for c in spec.columns if c.key == spec.effect)})"] if spec.effect else []
    return ["Method", *(["Params"] if spec.params else []), "Source", *[c.label for c in spec.columns], *effect]


def cells(spec: TableSpec, row: Row) -> list[str]:
    """A row's texts under `header(spec)`: the paper's numbers as printed, this run's rounded to the column."""
    signed = row.source.startswith("difference")
    out = [row.printed.get(c.key) or fmt(row.values[c.key], c.digits, signed or c.key == "overhead_percent")
           for c in spec.columns]
    if spec.effect:
        digits = next(c.digits for c in spec.columns if c.key == spec.effect)
        out.append(fmt(row.values["vs_vanilla"], digits, signed=True))
    return [row.system, *([row.params] if spec.params else []), row.source, *out]


def section(title: str, body: str, run: RunSpec) -> str:
    """A table or figure as a Markdown section: title, the Shapes-world caveat where it applies, body."""
    note = f"*{SHAPES_NOTE}*\n\n" if run.scale == "shapes" else ""
    return f"### {title}\n\n{note}{body}"


def markdown_table(spec: TableSpec, rows: list[Row]) -> str:
    columns = [*header(spec), "Note"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    group = ""
    for row in rows:
        if row.group and row.group != group:
            group = row.group
            lines.append(f"| **{group}** |" + " |" * (len(columns) - 1))
        lines.append("| " + " | ".join([*cells(spec, row), row.note]) + " |")
    return "\n".join(lines) + "\n"


LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                 "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_ESCAPES.get(char, char) for char in text)


def latex_table(spec: TableSpec, rows: list[Row], run: RunSpec) -> str:
    columns = header(spec)
    caption = spec.title + (" (Shapes-world numbers, not comparable in absolute value with the paper's)"
                            if run.scale == "shapes" else "")
    text_columns = 3 if spec.params else 2
    alignment = "l" * text_columns + "r" * (len(columns) - text_columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{latex_escape(caption)}}}",
             rf"\label{{tab:{spec.name}}}", rf"\begin{{tabular}}{{{alignment}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in columns) + r" \\", r"\midrule"]
    group = ""
    for row in rows:
        if row.group and row.group != group:
            group = row.group
            lines.append(rf"\multicolumn{{{len(columns)}}}{{l}}{{\textit{{{latex_escape(group)}}}}} \\")
        texts = [latex_escape(c) if c != MISSING else r"\textit{missing}" for c in cells(spec, row)]
        lines.append(" & ".join(texts) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def csv_text(fieldnames: list[str], rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def table_csv(spec: TableSpec, rows: list[Row]) -> str:
    keys = [c.key for c in spec.columns] + (["vs_vanilla"] if spec.effect else [])
    return csv_text(["group", "system", "params", "source", *keys, "note"],
                    [{"group": r.group, "system": r.system, "params": r.params, "source": r.source,
                      **{k: r.values[k] for k in keys}, "note": r.note} for r in rows])


def figure7_outputs(run: RunSpec, records: Records, provenance: Provenance) -> dict[str, bytes]:
    """figure7_{daid,faid}.png and the grids as Markdown, LaTeX and CSV, with the paper's selections."""
    outputs: dict[str, bytes] = {}
    markdown: list[str] = []
    latex, csv_rows = [], []
    reported = read_reported(FIGURE7, run.reported_dir)
    for ablation in ablations(run):
        grid = ablation_grid(ablation, records, provenance)
        kept = {PAPER_PARAMETERS.get(r["parameter"], r["parameter"]): r["value"] for r in reported
                if r["method"] == ablation.method and r["value"]}
        outputs[f"figure7_{ablation.method}.png"] = heatmap_png(ablation, grid, run, kept)
        columns = [f"{ablation.row_name} / {ablation.column_name}", *ablation.column_values]
        markdown += [f"**{ablation.title}** ({ablation.row_name} x {ablation.column_name}; "
                     f"![figure7_{ablation.method}.png](figure7_{ablation.method}.png))", "",
                     "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        latex += [rf"% Figure 7, {ablation.title}: FID, rows {ablation.row_name}, columns {ablation.column_name}",
                  r"\begin{tabular}{l" + "r" * len(ablation.column_values) + "}", r"\toprule",
                  " & ".join(latex_escape(c) for c in columns) + r" \\", r"\midrule"]
        for row_value, cells_ in zip(ablation.row_values, grid, strict=True):
            texts = [fmt(v, 2) for v in cells_]
            markdown.append("| " + " | ".join([row_value, *texts]) + " |")
            latex.append(" & ".join([latex_escape(row_value)] + [t if t != MISSING else r"\textit{missing}"
                                                                 for t in texts]) + r" \\")
            for column_value, value in zip(ablation.column_values, cells_, strict=True):
                csv_rows.append({"method": ablation.method, "row_parameter": ablation.row_name,
                                 "row_value": row_value, "column_parameter": ablation.column_name,
                                 "column_value": column_value, "fid": value,
                                 "record": f"metrics/mjhq_ablation/{ablation.method}/"
                                           f"{ablation.variant(row_value, column_value)}/fid.json"})
        latex += [r"\bottomrule", r"\end{tabular}", ""]
        markdown.append("")
    markdown += ["The paper's Figure 7 (`results/reported/figure7_ablation.csv`; its cell values are not in our copy "
                 "of the paper's text):", "", "| Method | Parameter | Paper's choice | Note |", "|---|---|---|---|"]
    for entry in reported:
        markdown.append(f"| {entry['method']} | {entry['parameter']} | {entry['value'] or MISSING} | {entry['note']} |")
    markdown.append("")
    title = "Figure 7: ablations on the MJHQ ablation subset (FID)"
    outputs[f"{FIGURE7}.md"] = section(title, "\n".join(markdown) + "\n", run).encode()
    outputs[f"{FIGURE7}.tex"] = ("\n".join(latex) + "\n").encode()
    outputs[f"{FIGURE7}.csv"] = csv_text(["method", "row_parameter", "row_value", "column_parameter",
                                          "column_value", "fid", "record"], csv_rows).encode()
    return outputs


def index_markdown(run: RunSpec, parts: list[str], provenance: Provenance) -> str:
    """README.md of the tables folder: what was rendered from what, every table, the files, what is missing."""
    used = sorted({r["source"] for r in provenance.rows if not r["source"].startswith("results/reported/")})
    lines = [f"# Tables and figures of run `{run.run_dir.name}` (scale: {run.scale})", ""]
    if run.scale == "shapes":
        lines += [f"**{SHAPES_NOTE}**", ""]
    lines += [f"Rendered by `arrag tables` from {len(used)} result records under `{run.run_dir}` and the paper's "
              "numbers in `results/reported/` (transcribed from the paper). \"missing\" marks a result whose record "
              "does not exist (yet); \"-\" a number the paper does not give. `provenance.csv` names the record "
              "(path, sha256, git commit, config hash) behind every number.", ""]
    lines += parts
    lines += ["## Files", ""] + [f"- [`{name}`]({name})" for name in OUTPUTS] + [""]
    lines += [f"## Records looked for and not found ({len(provenance.missing)})", ""]
    lines += [f"- `{path}`" for path in provenance.missing] or ["none"]
    return "\n".join(lines) + "\n"


def render_tables(run: RunSpec, out_dir: str | Path) -> dict[str, list[Row]]:
    """Write every output of `OUTPUTS` and README.md into `out_dir`; returns the rows of each table."""
    out_dir = Path(out_dir)
    provenance = Provenance()
    records = Records(run.run_dir, provenance)
    outputs: dict[str, bytes] = {}
    tables, parts = {}, []
    for spec in TABLES:
        rows = build_table(spec, run, records, provenance)
        tables[spec.name] = rows
        body = markdown_table(spec, rows)
        parts.append(f"### {spec.title}\n\n{body}")
        outputs[f"{spec.name}.md"] = section(spec.title, body, run).encode()
        outputs[f"{spec.name}.tex"] = latex_table(spec, rows, run).encode()
        outputs[f"{spec.name}.csv"] = table_csv(spec, rows).encode()
    figure = figure7_outputs(run, records, provenance)
    parts.append(figure[f"{FIGURE7}.md"].decode().replace(f"*{SHAPES_NOTE}*\n\n", ""))
    outputs.update(figure)
    outputs["provenance.csv"] = csv_text(["output", "row", "column", "value", "source", "source_sha256",
                                          "git_commit", "config_hash", "created"], provenance.rows).encode()
    if sorted(outputs) != sorted(OUTPUTS):
        raise RuntimeError(f"outputs {sorted(outputs)} differ from the declared OUTPUTS {sorted(OUTPUTS)}")
    for name, data in outputs.items():
        write_bytes_atomic(out_dir / name, data)
    write_bytes_atomic(out_dir / "README.md", index_markdown(run, parts, provenance).encode())
    return tables
