"""Planted kernel bugs against the CPU run of the kernel tests: each must make them fail.

``python -m benchmarks.kernel_mutations [--out F.md]`` copies ``kernels/`` once per mutation,
plants one bug (a text replacement that must match exactly once), and runs a subset of
tests/test_cuda_backend.py on the host build (tests/test_kernels_host.py's ``run_host_suite``)
under each thread schedule until one fails. A mutation is *caught* when a test fails: with a
wrong value, a NaN from poisoned memory, a barrier/shuffle/alignment check, or a crash (the run is
a subprocess). Results: docs/TESTING.md. tests/test_kernels_host.py runs two of them in the suite.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = ("shuffled", "warp-at-a-time")
# the GPU suite's cases the mutations run against: GQA 3, split-K with the reduce, chunked
# prefill over a cached prefix, a window, the cache write with skipped slots, block copies
CASES = [
    "test_decode_ragged[12-4-128-dtype1]", "test_split_equals_single",
    "test_prefill_and_chunked_prefill[12-4-64-dtype0]", "test_sliding_window[10-64-dtype0]",
    "test_write_kv_strided_and_skipped_slots[dtype0]", "test_copy_blocks_all_layers_one_launch",
]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str

    def apply(self, kernel_dir: Path) -> None:
        path = kernel_dir / self.file
        text = path.read_text()
        if text.count(self.old) != 1:
            raise ValueError(f"mutation {self.name!r}: {self.old!r} occurs {text.count(self.old)} times "
                             f"in {self.file} (want once): the kernel changed, update the mutation")
        path.write_text(text.replace(self.old, self.new))


PA, CO = "paged_attention.cu", "cache_ops.cu"
MUTATIONS = [
    Mutation("barrier after staging q removed", PA,
             "    }\n    __syncthreads();\n\n    const S* k_cache = kv;", "    }\n\n    const S* k_cache = kv;"),
    Mutation("barrier between softmax and P V removed", PA,
             "        }\n        __syncthreads();\n\n        // ---- phase 3", "        }\n\n        // ---- phase 3"),
    Mutation("GQA head order swapped (q load)", PA,
             "const long long h = (long long)kvh * G + g;", "const long long h = (long long)g * num_kv_heads + kvh;"),
    Mutation("causal mask off by one", PA, "(t <= pos_s[j] &&", "(t < pos_s[j] &&"),
    Mutation("window start off by one", PA, "t >= lo_s[j])", "t > lo_s[j])"),
    Mutation("reduce reads every partition", PA,
             "const int n_parts = min(pos / partition_size + 1, num_partitions);",
             "const int n_parts = num_partitions;"),
    Mutation("misaligned 16-byte K load", PA,
             "raw[s][v] = *reinterpret_cast<const uint4*>(k_cache + off + v * TPR * VEC);",
             "raw[s][v] = *reinterpret_cast<const uint4*>(k_cache + off + 1 + v * TPR * VEC);"),
    Mutation("padding slot (-1) written", CO, "if (slot < 0) return;", "if (slot < -1) return;"),
    Mutation("V written into the K plane", CO, "kv + plane + dst", "kv + dst"),
]
BY_NAME = {m.name: m for m in MUTATIONS}

_FAILED = re.compile(r"^(?:FAILED|ERROR) \S+?::(\S+)(?: - (.*))?$", re.M)


_UBSAN = re.compile(r"runtime error: (.*)$", re.M)


def why_failed(output: str, returncode: int) -> str:
    """What stopped the run: a sanitizer report (it aborts the process), else the first failing test
    and its reason from pytest's short summary, else the exit status."""
    m = _UBSAN.search(output)
    if m is not None:
        return f"aborted by UBSan: {m.group(1)[:160]}"
    m = _FAILED.search(output)
    if m is not None:
        return f"{m.group(1)}: {(m.group(2) or '').strip()[:160]}"
    return f"pytest exited with status {returncode} and no summary line"


def run_mutation(mutation: Mutation, cases: list[str] = CASES, schedules=SCHEDULES) -> dict:
    """Plant ``mutation`` in a copy of kernels/, run ``cases`` under each schedule until one fails."""
    sys.path.insert(0, str(ROOT))
    from tests.test_kernels_host import run_host_suite

    with tempfile.TemporaryDirectory() as tmp:
        kdir = Path(tmp) / "kernels"
        shutil.copytree(ROOT / "kernels", kdir)
        mutation.apply(kdir)
        for schedule in schedules:
            t0 = time.perf_counter()
            r = run_host_suite(cases, schedule, kernel_dir=str(kdir), extra_args=["-x"])
            seconds = time.perf_counter() - t0
            if r.returncode != 0:
                return {"mutation": mutation.name, "caught": True, "schedule": schedule,
                        "why": why_failed(r.stdout + r.stderr, r.returncode), "seconds": seconds}
        return {"mutation": mutation.name, "caught": False, "schedule": "-", "why": "every test passed",
                "seconds": seconds}


def markdown(rows: list[dict]) -> str:
    lines = ["| planted bug | caught | schedule | first failure |", "| --- | --- | --- | --- |"]
    for r in rows:
        why = r["why"].replace("|", "\\|")
        lines.append(f"| {r['mutation']} | {'yes' if r['caught'] else '**no**'} | {r['schedule']} | {why} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", choices=sorted(BY_NAME), help="run just this mutation (repeatable)")
    p.add_argument("--out", help="also write the markdown table here")
    args = p.parse_args(argv)
    rows = []
    for m in [BY_NAME[n] for n in args.only] if args.only else MUTATIONS:
        rows.append(run_mutation(m))
        r = rows[-1]
        print(f"{'caught' if r['caught'] else 'MISSED'}  {m.name}  ({r['schedule']}, {r['seconds']:.0f} s): {r['why']}",
              flush=True)
    table = markdown(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 0 if all(r["caught"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
