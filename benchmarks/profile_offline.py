"""Where offline generation spends its time: the issue #4 workload (32 chat prompts x 64 new tokens,
greedy, EOS ignored, bundled SmolLM2-135M in float32) through ``services.offline.LLM.generate``.

Modes:
    python -m benchmarks.profile_offline               # py-spy (--native) over the timed run, top-N tables
    python -m benchmarks.profile_offline --torch       # torch.profiler key_averages table of ops
    python -m benchmarks.profile_offline --no-profile  # just time it (output tok/s)
    python -m benchmarks.profile_offline --summarize RAW   # re-read a saved py-spy raw file

The py-spy mode runs this script again under ``py-spy record -f raw`` and keeps only the samples
taken inside ``timed_run`` (model loading and warm-up are left out). It prints three tables, in
percent of those samples: coarse categories (GEMM kernels, attention, step metadata, sampler,
scheduler, ...), the deepest project source line on the stack (inclusive of all it calls), and
the leaf frame (self time, native frames included). py-spy samples the main thread only; torch's
second intra-op thread mirrors the main thread's parallel regions, so the shares hold.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MARKER = "timed_run"
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_GEMM_LEAF = re.compile(r"gemm|mkl_blas", re.I)   # BLAS kernels: native unwinding often loses their callers
_GEMM_OPS = {"linear", "addmm", "mm", "matmul", "bmm", "baddbmm"}
_ATEN_OP = re.compile(r"^at::_ops::(\w+?)(?:_out)?::(?:call|redispatch)")
_PROJECT_DIRS = ("services/", "shared/", "benchmarks/")


# ------------------------------------------------------------------------------ the workload

def build_workload(num_prompts: int, max_tokens: int):
    """(LLM, prompts as token ids, SamplingParams): the engine set up like benchmarks.offline_vs_hf."""
    from benchmarks.offline_vs_hf import chat_prompts
    from services.offline import LLM, load_tokenizer
    from shared.config import EngineConfig, SchedulerConfig
    from shared.messages import SamplingParams

    tok = load_tokenizer("")
    prompts = [list(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False))
               for m in chat_prompts(num_prompts)]
    llm = LLM(EngineConfig(scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=4096)),
              tokenizer=tok)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    return llm, prompts, params


def timed_run(llm, prompts, params) -> float:
    """The profiled region (py-spy keeps only stacks through this function). Returns output tok/s."""
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    return sum(len(s.token_ids) for c in outs for s in c.samples) / dt


# ------------------------------------------------------------------------------ py-spy raw -> tables

def _parse_frame(frame: str) -> tuple[str, str, str]:
    """'func (path/file.py:12)' -> (func, path, line); native frames have no line."""
    m = _FRAME.match(frame)
    return (m["func"], m["file"], m["line"] or "") if m else (frame, "", "")


def _project_path(path: str) -> str | None:
    """Repo-relative path of a project source file, None for anything else."""
    for d in _PROJECT_DIRS:
        i = path.find(d)
        if i >= 0 and path.endswith(".py") and "site-packages" not in path:
            return path[i:]
    return None


def _aten_op(frames: list[tuple[str, str, str]], after: int) -> str:
    """Name of the first ATen op called below frame ``after`` ('python' when none: interpreter time)."""
    if _GEMM_LEAF.search(frames[-1][0]):
        return "GEMM"
    for func, _, _ in frames[after + 1:]:
        m = _ATEN_OP.match(func)
        if m:
            return "GEMM" if m[1] in _GEMM_OPS else m[1]
    return "python"


def _category(frames: list[tuple[str, str, str]]) -> str:
    """Coarse bucket of one stack (frames root -> leaf): the component, then the ATen op it ran."""
    files = [_project_path(f) or "" for _, f, _ in frames]
    if any(f.startswith("services/scheduler/") for f in files):
        return "scheduler"
    if any(f.endswith("executor/sampler.py") for f in files):
        return "sampler"
    deepest = next((i for i in range(len(files) - 1, -1, -1) if files[i]), None)
    if deepest is None:
        return "other"
    where, func, op = files[deepest], frames[deepest][0], _aten_op(frames, deepest)
    if where.startswith("services/executor/attention/"):
        return f"attention: {op} ({func})"
    if where.endswith("executor/model.py"):
        return "lm_head: " + op if func == "compute_logits" else f"model: {op}"
    if where.endswith("executor/worker.py"):
        return f"worker: {op} ({func})"
    return f"{where}: {func}"


def summarize(raw_path: str, top: int = 25, marker: str = MARKER) -> str:
    """Tables (percent of the samples under ``marker``) from a py-spy ``-f raw`` file."""
    categories: collections.Counter = collections.Counter()
    lines: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    total = 0
    with open(raw_path) as f:
        for row in f:
            stack, _, count = row.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            raw_frames = stack.split(";")
            start = next((i for i, fr in enumerate(raw_frames) if fr.startswith(marker + " (")), None)
            if start is None:
                continue
            n = int(count)
            frames = [_parse_frame(fr) for fr in raw_frames[start:]]
            total += n
            categories[_category(frames)] += n
            deepest = next(((fn, _project_path(p), ln) for fn, p, ln in reversed(frames) if _project_path(p)), None)
            if deepest is not None:
                fn, p, ln = deepest
                lines[f"{p}:{ln} {fn}  | {_source_line(p, ln)}"] += n
            leaf_func, leaf_file, _ = frames[-1]
            leaves[f"{leaf_func} ({os.path.basename(leaf_file)})"] += n
    if total == 0:
        return f"no samples under {marker!r} in {raw_path}"

    def table(title: str, counter: collections.Counter, limit: int) -> str:
        rows = [f"{100 * n / total:6.1f}%  {name}" for name, n in counter.most_common(limit)]
        return "\n".join([f"== {title} ({total} samples)", *rows])

    gomp = sum(n for name, n in leaves.items() if "libgomp" in name)
    return "\n\n".join([f"OpenMP fork/join and barrier wait (leaf in libgomp): {100 * gomp / total:.1f}%",
                        table("by category: component, ATen op", categories, top),
                        table("by deepest project source line (inclusive)", lines, top),
                        table("by leaf frame (self)", leaves, top)])


def _source_line(path: str, line: str) -> str:
    import linecache
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return linecache.getline(os.path.join(root, path), int(line)).strip()[:70] if line else ""


# ------------------------------------------------------------------------------ modes

def _run_under_py_spy(args: argparse.Namespace) -> None:
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        raise SystemExit("py-spy not found (pip install py-spy, it is in the dev extra)")
    raw = args.raw or os.path.join(tempfile.mkdtemp(prefix="profile_offline_"), "profile.raw")
    child = [sys.executable, "-m", "benchmarks.profile_offline", "--no-profile",
             "--num-prompts", str(args.num_prompts), "--max-tokens", str(args.max_tokens)]
    cmd = [spy, "record", "--native", "-r", str(args.rate), "-f", "raw", "-o", raw, "--", *child]
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    print(f"py-spy raw samples: {raw}")
    print(summarize(raw, args.top))


def _run_torch_profiler(args: argparse.Namespace) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    llm, prompts, params = build_workload(args.num_prompts, args.max_tokens)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tok_s = timed_run(llm, prompts, params)
    print(f"output tok/s under torch.profiler: {tok_s:.1f} (threads {torch.get_num_threads()})")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--top", type=int, default=25, help="rows per table")
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--raw", help="where to keep py-spy's raw output (default: a temp dir)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--torch", action="store_true", help="torch.profiler op table instead of py-spy")
    mode.add_argument("--no-profile", action="store_true", help="only time the run")
    mode.add_argument("--summarize", metavar="RAW", help="only aggregate an existing py-spy raw file")
    args = ap.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize, args.top))
    elif args.torch:
        _run_torch_profiler(args)
    elif args.no_profile:
        import torch
        tok_s = timed_run(*build_workload(args.num_prompts, args.max_tokens))
        print(f"output tok/s: {tok_s:.1f} (threads {torch.get_num_threads()})")
    else:
        _run_under_py_spy(args)


if __name__ == "__main__":
    main()
