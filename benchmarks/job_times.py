"""Where a workflow run's time went: per-rule wall and core time from a Snakemake log, as JSON.

    python benchmarks/job_times.py .snakemake/log/<newest>.snakemake.log

Each job's wall time runs from the timestamp Snakemake printed before it started to the one before "Finished
jobid"; core-seconds are wall x the job's threads (1 where the log names none). With jobs running side by side,
the rules' wall times add up to more than the run's: core-seconds / cores is the share of the run a rule took.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path

STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
STARTED = re.compile(r"^(?:local)?rule (\w+):$")
FIELD = re.compile(r"^\s+(jobid|threads|wildcards): (.*)$")
FINISHED = re.compile(r"^Finished jobid: (\d+)")


def parse_log(lines: list[str]) -> list[dict]:
    """Jobs of a Snakemake log: [{rule, jobid, wildcards, threads, start, end}], times as datetimes."""
    jobs: dict[str, dict] = {}
    stamp = None
    current = None
    for line in lines:
        line = line.rstrip("\n")
        if match := STAMP.match(line):
            stamp = datetime.strptime(match.group(1), "%a %b %d %H:%M:%S %Y")
            current = None
        elif match := STARTED.match(line):
            current = {"rule": match.group(1), "start": stamp, "threads": 1, "wildcards": ""}
        elif current is not None and (match := FIELD.match(line)):
            key, value = match.groups()
            if key == "jobid":
                jobs[value] = current
            elif key == "threads":
                current["threads"] = int(value)
            else:
                current["wildcards"] = value
        elif (match := FINISHED.match(line)) and match.group(1) in jobs:
            jobs[match.group(1)]["end"] = stamp
    return [dict(job, jobid=int(jobid)) for jobid, job in jobs.items() if "end" in job]


def summarise(jobs: list[dict]) -> dict:
    """Per rule: jobs, wall seconds (sum, max) and core-seconds; the run's span; the slowest jobs."""
    rules: dict[str, dict] = defaultdict(lambda: {"jobs": 0, "wall_s": 0.0, "max_wall_s": 0.0, "core_s": 0.0})
    for job in jobs:
        wall = (job["end"] - job["start"]).total_seconds()
        job["wall_s"] = wall
        entry = rules[job["rule"]]
        entry["jobs"] += 1
        entry["wall_s"] += wall
        entry["max_wall_s"] = max(entry["max_wall_s"], wall)
        entry["core_s"] += wall * job["threads"]
    span = (max(j["end"] for j in jobs) - min(j["start"] for j in jobs)).total_seconds() if jobs else 0.0
    ordered = dict(sorted(rules.items(), key=lambda item: -item[1]["core_s"]))
    slowest = sorted(jobs, key=lambda j: -j["wall_s"])[:10]
    return {"span_s": span, "jobs": len(jobs), "core_s": sum(r["core_s"] for r in rules.values()), "rules": ordered,
            "slowest_jobs": [{k: j[k] for k in ("rule", "wildcards", "threads", "wall_s")} for j in slowest]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path, help="a Snakemake log (.snakemake/log/*.snakemake.log)")
    args = parser.parse_args()
    if not args.log.is_file():
        sys.exit(f"{args.log}: no such log; Snakemake writes one per run under .snakemake/log/")
    jobs = parse_log(args.log.read_text().splitlines())
    if not jobs:
        sys.exit(f"{args.log}: no finished job found (is it a Snakemake log?)")
    print(json.dumps(summarise(jobs), indent=1))


if __name__ == "__main__":
    main()
