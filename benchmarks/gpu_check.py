"""The GPU check: everything a CUDA machine can tell us, in one run (benchmarks/gpu_check.sh).

    python -m benchmarks.gpu_check --out DIR [--only STEP ...] [--budget-s 480]

Steps, each a subprocess with its own time limit so one failure or hang does not stop the rest:

* ``kernels``       tests/test_cuda_backend.py on CUDA: the kernel tests against the torch
                    reference, and the executor with the cuda backend against the torch backend;
* ``executor``      tests/test_model_families.py's cuda cases: the engine on the cuda backend
                    equals HF ``generate`` (prefix hits, forks) on each family's tiny checkpoint;
* ``attention``     benchmarks/attention_kernels.py: decode bandwidth as a fraction of the copy
                    bandwidth measured in the same run, paged against contiguous, against SDPA;
* ``e2e-fp16``      random weights of Llama-3.2-1B's shape in float16: the engine (cuda backend)
                    against HF ``generate`` on the same checkpoint, greedy, token for token.

Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` (and each step's log). Exit status 0 when
every step that ran passed. Without CUDA it writes nothing and says so (exit 2): it has not run
on a GPU so far (not run: no GPU at hand).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("kernels", "executor", "attention", "e2e-fp16")
LIMITS = {"kernels": 120, "executor": 90, "attention": 90, "e2e-fp16": 150}   # seconds: under 8 minutes in all
# Llama-3.2-1B's layer shapes (the vocabulary is the test tokenizer's: the head's size changes no kernel)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, max_position_embeddings=4096)
SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=4096)
_ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\S+)\s+(\S+)\s+([\d.]+)\s+(\d+)\s+(\d+)%(\s*L2)?\s*$")


def junit_counts(path: Path) -> dict:
    """tests / failures / errors / skipped of a pytest junit XML file."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None]
    return counts


def parse_attention(text: str) -> dict:
    """The rows of benchmarks/attention_kernels.py's table, and its copy bandwidth."""
    copy = re.search(r"copy bandwidth \(read \+ write\): (\d+) GB/s", text)
    device = re.search(r"^device: (.*)$", text, re.M)
    rows = [dict(batch=int(m[1]), context=int(m[2]), variant=m[3], plan=m[4], us=float(m[5]),
                 gb_s=int(m[6]), pct_copy=int(m[7]), l2=bool(m[8])) for m in map(_ROW.match, text.splitlines()) if m]
    return {"device": device[1] if device else None, "copy_gb_s": int(copy[1]) if copy else None, "rows": rows}


def run_step(name: str, out: Path, limit: float) -> dict:
    log = out / f"{name}.log"
    py = sys.executable
    xml = out / f"{name}.xml"
    cmd = {
        "kernels": [py, "-m", "pytest", "-q", "tests/test_cuda_backend.py", f"--junitxml={xml}"],
        "executor": [py, "-m", "pytest", "-q", "tests/test_model_families.py", "-k", "cuda", f"--junitxml={xml}"],
        "attention": [py, "-m", "benchmarks.attention_kernels"],
        "e2e-fp16": [py, "-m", "benchmarks.gpu_check", "--e2e", str(out / "e2e-fp16.json")],
    }[name]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit,
                              env=dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1"))
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = None, (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    log.write_text(text)
    result = {"step": name, "seconds": round(time.perf_counter() - t0, 1), "exit": rc,
              "ok": rc == 0, "log": log.name}
    if rc is None:
        result["error"] = f"over its {limit:.0f} s limit"
    if name in ("kernels", "executor") and xml.exists():
        result.update(junit_counts(xml))
        result["ok"] = rc == 0 and result["tests"] > result["skipped"]      # all skipped is not a pass
    elif name == "attention":
        result.update(parse_attention(text))
        result["ok"] = rc == 0 and bool(result["rows"])
    elif name == "e2e-fp16" and (out / "e2e-fp16.json").exists():
        result.update(json.loads((out / "e2e-fp16.json").read_text()))
        result["ok"] = rc == 0 and result.get("all_equal_or_near_tie", False)
    return result


# ------------------------------------------------------------------------------ e2e fp16

def e2e_fp16(device: str = "cuda", shapes: dict | None = None, max_new: int = 48) -> dict:
    """Random Llama-1B-shaped fp16 checkpoint: engine tokens vs HF ``generate``'s, per prompt. A
    difference is reported with HF's top-1 minus top-2 logit gap where the two first part: in
    fp16, a near-tie (gap under 0.05) can fall either way for two correct kernels. On a CPU (the
    dry run of this logic) float32 and the default backend."""
    import torch

    dtype = torch.float16 if device == "cuda" else torch.float32

    sys.path.insert(0, str(ROOT))
    from tests import model_families as mf
    from services.offline import Engine
    from shared.config import CacheConfig, EngineConfig, SchedulerConfig
    from shared.messages import AddRequest, SamplingParams

    g = torch.Generator().manual_seed(0)
    vocab = mf.vocab_size()
    lengths = [5, 37, 200, 700]
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ckpt = mf.make_checkpoint("llama", Path(tmp) / "llama-1b", dtype=dtype, **(shapes or LLAMA_1B))
        build_s = time.perf_counter() - t0
        hf = mf.load_hf(ckpt, dtype).to(device)
        want, gaps = [], []
        with torch.inference_mode():
            for ids in prompts:
                x = torch.tensor([ids], device=device)
                o = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                                eos_token_id=[], pad_token_id=mf.UNK_ID, output_logits=True,
                                return_dict_in_generate=True)
                want.append(o.sequences[0, len(ids):].tolist())
                gaps.append([float(l[0].float().topk(2).values.diff().abs()) for l in o.logits])
        del hf
        config = EngineConfig(model=ckpt, device=device, dtype=str(dtype).removeprefix("torch."),
                              attention_backend="cuda" if device == "cuda" else "auto",
                              cache=CacheConfig(block_size=16, num_blocks=512),
                              scheduler=SchedulerConfig(max_model_len=1024)).validate()
        engine = Engine(config)
        t0 = time.perf_counter()
        got = engine.run([AddRequest(request_id=str(i), prompt_token_ids=ids,
                                     sampling=SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True))
                          for i, ids in enumerate(prompts)])
        engine_s = time.perf_counter() - t0
    rows = []
    for i, (ids, w) in enumerate(zip(prompts, want)):
        t = got[str(i)][0].token_ids
        first = next((k for k, (a, b) in enumerate(zip(t, w)) if a != b), None)
        rows.append({"prompt_tokens": len(ids), "equal_tokens": sum(a == b for a, b in zip(t, w)),
                     "new_tokens": len(w), "first_difference": first,
                     "hf_gap_there": None if first is None else round(gaps[i][first], 4)})
    ok = all(r["first_difference"] is None or r["hf_gap_there"] < 0.05 for r in rows)
    return {"device": device, "dtype": str(dtype), "shapes": shapes or LLAMA_1B, "checkpoint_build_s": round(build_s, 1),
            "engine_s": round(engine_s, 2), "prompts": rows, "all_equal_or_near_tie": ok}


# ------------------------------------------------------------------------------ report

def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device']}", "", f"{report['date']}, {report['seconds']:.0f} s in all.", "",
             "| step | ok | seconds | result |", "| --- | --- | --- | --- |"]
    for s in report["steps"]:
        if "tests" in s:
            what = f"{s['tests']} tests, {s['failures'] + s['errors']} failed, {s['skipped']} skipped"
            if s["failed"]:
                what += ": " + ", ".join(s["failed"][:5])
        elif "rows" in s:
            what = f"{len(s['rows'])} rows, copy {s['copy_gb_s']} GB/s"
        elif "prompts" in s:
            what = "; ".join(f"{p['equal_tokens']}/{p['new_tokens']} equal (prompt {p['prompt_tokens']})"
                             for p in s["prompts"])
        else:
            what = ""
        lines.append(f"| {s['step']} | {'yes' if s['ok'] else '**no**'} | {s['seconds']} | "
                     f"{s.get('error', what)} |")
    attention = next((s for s in report["steps"] if s.get("rows")), None)
    if attention:
        lines += ["", f"Decode attention ({attention['device']}): bandwidth as % of the copy bandwidth",
                  "", "| batch | context | variant | plan | µs | GB/s | % copy |", "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['batch']} | {r['context']} | {r['variant']} | {r['plan']} | {r['us']} | {r['gb_s']} | "
                  f"{r['pct_copy']}{' (L2)' if r['l2'] else ''} |" for r in attention["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json, gpu_check.md and the logs")
    p.add_argument("--only", action="append", choices=STEPS, help="run just this step (repeatable)")
    p.add_argument("--e2e", metavar="JSON", help="only the e2e-fp16 comparison, in this process; its result here")
    p.add_argument("--device", default="cuda", help="with --e2e: 'cpu' for a dry run of its logic")
    p.add_argument("--small", action="store_true", help="with --e2e: tiny shapes instead of Llama-1B's")
    args = p.parse_args(argv)
    import torch
    if args.e2e:
        result = e2e_fp16(args.device, SMALL if args.small else None)
        Path(args.e2e).write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
        return 0 if result["all_equal_or_near_tie"] else 1
    if not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False); nothing run", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    steps = []
    for name in args.only or STEPS:
        steps.append(run_step(name, out, LIMITS[name]))
        s = steps[-1]
        print(f"{name}: {'ok' if s['ok'] else 'FAILED'} in {s['seconds']} s ({s['log']})", flush=True)
    report = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "torch": torch.__version__, "seconds": time.perf_counter() - t0, "steps": steps}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(s["ok"] for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
