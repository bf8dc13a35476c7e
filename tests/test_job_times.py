"""benchmarks/job_times.py: per-rule wall and core time from a Snakemake log, checked on a hand-written log."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "job_times.py"
spec = importlib.util.spec_from_file_location("job_times", SCRIPT)
job_times = importlib.util.module_from_spec(spec)
spec.loader.exec_module(job_times)

# Two jobs side by side (a two-thread training and a one-thread metric), then a third; a job that never finished.
LOG = """Building DAG of jobs...
[Thu Dec  3 12:00:00 2026]
localrule train:
    output: results/m
    jobid: 1
    threads: 2
    resources: tmpdir=/tmp

[Thu Dec  3 12:00:10 2026]
rule metric:
    output: results/a.json
    jobid: 2
    wildcards: method=daid

[Thu Dec  3 12:01:00 2026]
Finished jobid: 2 (Rule: metric)
1 of 4 steps (25%) done

[Thu Dec  3 12:02:00 2026]
Finished jobid: 1 (Rule: train)
[Thu Dec  3 12:02:00 2026]
rule metric:
    jobid: 3
    wildcards: method=faid
[Thu Dec  3 12:02:30 2026]
Finished jobid: 3 (Rule: metric)
[Thu Dec  3 12:02:30 2026]
rule metric:
    jobid: 4
"""


def test_rules_add_up_wall_and_core_seconds():
    summary = job_times.summarise(job_times.parse_log(LOG.splitlines()))
    assert summary["span_s"] == 150 and summary["jobs"] == 3
    assert summary["rules"]["train"] == {"jobs": 1, "wall_s": 120, "max_wall_s": 120, "core_s": 240}
    assert summary["rules"]["metric"] == {"jobs": 2, "wall_s": 80, "max_wall_s": 50, "core_s": 80}
    assert list(summary["rules"]) == ["train", "metric"]  # by core-seconds
    assert summary["core_s"] == 320
    assert summary["slowest_jobs"][1] == {"rule": "metric", "wildcards": "method=daid", "threads": 1, "wall_s": 50}


def test_the_command_prints_json_and_refuses_a_log_without_jobs(tmp_path):
    log = tmp_path / "run.snakemake.log"
    log.write_text(LOG)
    done = subprocess.run([sys.executable, str(SCRIPT), str(log)], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["rules"]["train"]["core_s"] == 240
    log.write_text("Building DAG of jobs...\n")
    failed = subprocess.run([sys.executable, str(SCRIPT), str(log)], capture_output=True, text=True)
    assert failed.returncode != 0 and "no finished job" in failed.stderr
