"""Select a method's hyperparameters from its ablation: the cell with the lowest FID on the ablation subset.

As in the paper, the values used for the main tables are selected from the ablation grid (DAiD: lambda x tau;
FAiD: hops x m) unless the config pins them. Cells are named like ``lam0.3_tau1.0`` or ``hops12_m2``; the FID
records are `python -m evaluators fid` outputs at ``metrics/mjhq_ablation/<method>/<cell>/fid.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from evaluators.io import write_json_atomic

STRING_PARAMETERS = {"hops"}  # hop levels such as "12" stay strings


def parse_cell(cell: str) -> dict:
    """'lam0.3_tau1.0' -> {'lam': 0.3, 'tau': 1.0}; 'hops12_m2' -> {'hops': '12', 'm': 2}."""
    values = {}
    for part in cell.split("_"):
        match = re.fullmatch(r"([a-z]+)([0-9.]+)", part)
        if match is None:
            raise ValueError(f"cannot read ablation cell {cell!r}: expected parts like 'lam0.3' or 'hops12'")
        name, text = match.groups()
        values[name] = text if name in STRING_PARAMETERS else (int(text) if text.isdigit() else float(text))
    return values


def select(method: str, fid_records: list[str | Path], pinned: dict | None = None) -> dict:
    """The selection record: the lowest-FID cell (ties: the first in the given order) or the pinned values."""
    candidates = []
    for path in fid_records:
        cell = Path(path).parent.name
        fid = json.loads(Path(path).read_text())["fid"]
        candidates.append({"variant": cell, "values": parse_cell(cell), "fid": fid, "record": str(path)})
    if not candidates and not pinned:
        raise ValueError(f"no ablation FID records for {method} and no pinned values")
    if pinned:
        return {"method": method, "values": pinned, "pinned": True, "fid": None, "candidates": candidates}
    best = min(candidates, key=lambda c: c["fid"])
    return {"method": method, "values": best["values"], "variant": best["variant"], "pinned": False,
            "fid": best["fid"], "candidates": candidates}


def write_selection(method: str, fid_records: list[str | Path], out: str | Path, pinned: dict | None = None) -> dict:
    record = select(method, fid_records, pinned)
    write_json_atomic(out, record)
    return record
