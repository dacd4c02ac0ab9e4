"""The CUDA kernel files run on the CPU: tests/test_cuda_backend.py (the GPU suite) in a subprocess
with PAGEDSERVE_KERNEL_TARGET=host, i.e. kernels/*.cu compiled by the host C++ compiler with
kernels/host/cuda_host.h (threads as fibers, barrier and shuffle checks, UBSan alignment, NaN-filled
shared memory and outputs) and launched through CudaBackend with only the launch replaced
(services/executor/attention/host_kernels.py). A subprocess, so a kernel that crashes fails a test
instead of pytest. A covering subset of the GPU suite's cases, under two thread orders."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.kernels, pytest.mark.skipif(
    not any(os.access(os.path.join(p, "g++"), os.X_OK) for p in os.environ.get("PATH", "").split(os.pathsep)),
    reason="no g++ for the host build of the kernels")]

# GQA 1, 3 and 8; head_dim 64, 128, 256; block sizes 16 and 32; fp32, fp16 (dtype0), bf16 (dtype1);
# decode single pass and split-K, prefill and chunked prefill over a cached prefix, windows
ATTENTION_CASES = [
    "test_decode_ragged[8-8-64-dtype0]", "test_decode_ragged[12-4-128-dtype1]", "test_decode_ragged[32-4-64-dtype1]",
    "test_decode_fp32_and_block_sizes[16]", "test_decode_fp32_and_block_sizes[32]", "test_split_equals_single",
    "test_prefill_and_chunked_prefill[8-8-128-dtype1]", "test_prefill_and_chunked_prefill[12-4-64-dtype0]",
    "test_prefill_and_chunked_prefill[32-4-64-dtype1]",
    "test_sliding_window[1-64-dtype0]", "test_sliding_window[600-256-dtype1]",
    "test_decode_head_dim_256[dtype2]",
]
# the cache write with skipped slots, block copies, and the whole executor (swap included)
OTHER_CASES = [
    "test_write_kv_strided_and_skipped_slots[dtype0]", "test_write_kv_strided_and_skipped_slots[dtype2]",
    "test_copy_blocks_all_layers_one_launch", "test_the_executor_on_these_kernels_equals_the_torch_backend",
]
# the second schedule reruns what has barriers and shuffles between threads: the attention cases
SCHEDULES = {"shuffled": ATTENTION_CASES + OTHER_CASES, "warp-at-a-time": ATTENTION_CASES}


def run_host_suite(cases: list[str], schedule: str, kernel_dir: str | None = None,
                   extra_args: list[str] = ()) -> subprocess.CompletedProcess:
    """tests/test_cuda_backend.py's ``cases`` on the host build (of ``kernel_dir``: default kernels/).
    ``-s``: a check that aborts the process (UBSan) still has its message reach our stderr."""
    env = dict(os.environ, PAGEDSERVE_KERNEL_TARGET="host", PAGEDSERVE_KERNEL_SCHEDULE=schedule, COLUMNS="300")
    if kernel_dir is not None:
        env["PAGEDSERVE_KERNEL_DIR"] = kernel_dir
    ids = [f"tests/test_cuda_backend.py::{c}" for c in cases]
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *extra_args, *ids],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_kernels_equal_the_torch_reference_on_the_cpu(schedule):
    cases = SCHEDULES[schedule]
    r = run_host_suite(cases, schedule)
    tail = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, f"host kernel suite failed ({schedule}):\n{tail}"
    assert f"{len(cases)} passed" in r.stdout, tail


@pytest.mark.parametrize("name", ["barrier between softmax and P V removed", "misaligned 16-byte K load"])
def test_a_planted_kernel_bug_fails_the_kernel_tests(name):
    """Two of benchmarks/kernel_mutations.py's planted bugs (all of them: docs/TESTING.md): a race
    the thread schedule exposes, and a misaligned vector load that UBSan stops."""
    from benchmarks.kernel_mutations import BY_NAME, run_mutation
    result = run_mutation(BY_NAME[name], cases=["test_decode_ragged[12-4-128-dtype1]"])
    assert result["caught"], result
    if "misaligned" in name:
        assert "misaligned address" in result["why"], result
