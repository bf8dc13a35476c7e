import os
from pathlib import Path

import pytest
import torch

# torch reads OMP_NUM_THREADS but caps it at the number of cores: follow it exactly, so that `OMP_NUM_THREADS=4`
# on a 2-core machine runs the suite's torch code at 4 threads (summation orders of a 4-core machine).
if os.environ.get("OMP_NUM_THREADS", "").isdigit():
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parent.parent
SHARED_BENCHMARKS = REPO.parent / "shared" / "benchmarks"


@pytest.fixture(scope="session")
def shared_benchmarks() -> Path:
    """The real GenEval metadata and DPG-Bench prompts laid beside the repository (../shared)."""
    if not SHARED_BENCHMARKS.is_dir():
        pytest.skip(f"real benchmark files not found at {SHARED_BENCHMARKS}")
    return SHARED_BENCHMARKS
