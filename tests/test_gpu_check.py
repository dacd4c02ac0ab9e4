"""benchmarks/gpu_check.py off the GPU: its parsers and report, its refusal without CUDA, and its
fp16 end-to-end step's logic as a CPU dry run (float32, tiny shapes). The GPU run itself: not run,
no GPU at hand."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]

ATTENTION_OUTPUT = """device: NVIDIA H200, 132 SMs, L2 60 MiB
device copy bandwidth (read + write): 3900 GB/s
decode: fp16, Hq=32, Hkv=8, D=128, block=16

batch    ctx variant      plan              us    GB/s  %copy
-------------------------------------------------------------
    1    512 paged/auto   single          12.3     170     4% L2
   32   8192 sdpa         dense          300.0    3000    77%
"""


def test_the_attention_table_is_parsed():
    parsed = gpu_check.parse_attention(ATTENTION_OUTPUT)
    assert parsed["copy_gb_s"] == 3900 and parsed["device"].startswith("NVIDIA H200")
    assert parsed["rows"] == [
        dict(batch=1, context=512, variant="paged/auto", plan="single", us=12.3, gb_s=170, pct_copy=4, l2=True),
        dict(batch=32, context=8192, variant="sdpa", plan="dense", us=300.0, gb_s=3000, pct_copy=77, l2=False)]


def test_junit_counts_and_the_report(tmp_path):
    xml = tmp_path / "k.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                   '<testcase classname="tests.t" name="a"/><testcase classname="tests.t" name="b"><failure/></testcase>'
                   '<testcase classname="tests.t" name="c"><skipped/></testcase></testsuite></testsuites>')
    counts = gpu_check.junit_counts(xml)
    assert counts == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1, "failed": ["tests.t::b"]}
    attention = dict(gpu_check.parse_attention(ATTENTION_OUTPUT), step="attention", ok=True, seconds=2.0)
    md = gpu_check.markdown({"device": "H200", "date": "today", "seconds": 9.0, "steps": [
        dict(counts, step="kernels", ok=False, seconds=5.0), attention]})
    assert "| kernels | **no** | 5.0 | 3 tests, 1 failed, 1 skipped: tests.t::b |" in md
    assert "| 1 | 512 | paged/auto | single | 12.3 | 170 | 4 (L2) |" in md


@pytest.mark.integration
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_refuses_and_writes_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path / "out")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_the_e2e_step_dry_run_on_the_cpu(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--e2e", str(tmp_path / "e2e.json"),
                        "--device", "cpu", "--small"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "e2e.json").read_text())
    assert result["all_equal_or_near_tie"] and len(result["prompts"]) == 4
    assert all(p["equal_tokens"] == p["new_tokens"] == 48 for p in result["prompts"])     # float32: exact
