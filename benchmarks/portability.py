"""The test suite across thread counts and CPU kernel levels, from a fresh clone: pass / fail / time per cell.

    python benchmarks/portability.py [--threads 1 2 4] [--cpus native avx2] [--pytest-args "-m 'not slow'"]
    make portability

Clones the repository's committed HEAD into a temporary folder beside it, installs it there once
(`make install`), then runs `make test` once per cell (OMP_NUM_THREADS x CPU), resetting the clone to its
committed state before each cell (`git clean -xdf`, the virtual environment kept). `avx2` emulates an AVX2-only
CPU on any x86 machine: ATEN_CPU_CAPABILITY=avx2 (torch's kernels) and ONEDNN_MAX_CPU_ISA=AVX2 (oneDNN's), which
turns off native bf16 (`arrag.precision` then resolves `auto` to fp32). Each cell's pytest output goes to
$TMPDIR/arrag-portability-<cpu>-t<threads>.log. Prints the table, then one JSON object;
the clone is deleted at the end (a virtual environment is about 6 GB) unless --keep.
"""

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CPUS = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def counts(output: str) -> dict[str, int]:
    """pytest's summary line ('3 failed, 320 passed, 2 skipped in ...') as numbers."""
    summary = [line for line in output.splitlines() if re.search(r"\b(passed|failed|error)", line) and " in " in line]
    found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", summary[-1] if summary else "")
    return {name.rstrip("s") if name.startswith("error") else name: int(n) for n, name in found}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cpus", nargs="+", choices=sorted(CPUS), default=["native", "avx2"])
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments (PYTEST_ADDOPTS), e.g. -x")
    parser.add_argument("--keep", action="store_true", help="keep the clone (path printed)")
    args = parser.parse_args()

    # beside the repository, as CI's clone is: tests read ../shared
    clone = Path(tempfile.mkdtemp(prefix="arrag-portability-", dir=REPO.parent))
    cells = []
    try:
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True,
                                check=True).stdout.strip()
        started = time.perf_counter()
        subprocess.run(["make", "install"], cwd=clone, check=True, stdout=subprocess.DEVNULL)
        install_seconds = time.perf_counter() - started
        for cpu in args.cpus:
            for threads in args.threads:
                subprocess.run(["git", "clean", "-xdfq", "-e", ".venv"], cwd=clone, check=True)
                env = {**os.environ, **CPUS[cpu], "OMP_NUM_THREADS": str(threads), "PYTEST_ADDOPTS": args.pytest_args}
                started = time.perf_counter()
                result = subprocess.run(["make", "test"], cwd=clone, env=env, capture_output=True, text=True)
                seconds = time.perf_counter() - started
                output = result.stdout + result.stderr
                log = Path(tempfile.gettempdir()) / f"arrag-portability-{cpu}-t{threads}.log"
                log.write_text(output)  # the whole pytest output, its slowest tests included
                cell = {"cpu": cpu, "threads": threads, "result": "pass" if result.returncode == 0 else "FAIL",
                        "seconds": round(seconds), **counts(output),
                        "failures": re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)}
                cells.append(cell)
                print(f"{cpu:>6} x {threads} threads: {cell['result']} {counts(output)} in {seconds:.0f} s ({log})",
                      file=sys.stderr, flush=True)
    finally:
        if args.keep:
            print(f"clone kept at {clone}", file=sys.stderr)
        else:
            shutil.rmtree(clone, ignore_errors=True)

    print(f"| CPU ({cpu_model()}) | threads | result | passed | failed | skipped | time |")
    print("|---|---|---|---|---|---|---|")
    for c in cells:
        print(f"| {c['cpu']} | {c['threads']} | {c['result']} | {c.get('passed', 0)} | "
              f"{c.get('failed', 0) + c.get('error', 0)} | {c.get('skipped', 0)} | {c['seconds'] // 60} min "
              f"{c['seconds'] % 60} s |")
    print(json.dumps({"commit": commit, "cpu": cpu_model(), "install_seconds": round(install_seconds),
                      "pytest_args": shlex.split(args.pytest_args), "cells": cells}))
    return 0 if all(c["result"] == "pass" for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
