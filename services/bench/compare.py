"""`pagedserve bench compare`: offline output tok/s of pagedserve vs Hugging Face `generate` (left-
padded batch) vs transformers' `generate_batch` (continuous batching, paged cache).

Same weights, same prompts (N chat prompts of the model's template), greedy, EOS ignored so every
system produces N x max_tokens tokens. Each system runs in its own process, one after the other
(`pagedserve bench compare --only SYSTEM --result-file F`), so none inherits another's memory,
threads or allocator state; each first runs a 2-prompt warm-up, then the timed batch.
``--model random:<preset>`` builds seeded random weights of that shape once per process (the same
values in each), so the GPU variant is the same command with ``--dtype float16 --device cuda``.
The parent prints a table (tok/s and pagedserve's ratio to each), and with ``--out DIR`` writes
compare.json and compare.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from shared.config import add_options

SYSTEMS = ("pagedserve", "hf-padded", "hf-generate-batch")
LABELS = {"pagedserve": "pagedserve", "hf-padded": "HF generate (padded batch)",
          "hf-generate-batch": "HF generate_batch (continuous)"}

PAGEDSERVE_BATCH_TOKENS = 4096     # token budget per step, also given to generate_batch

TOPICS = ["the moon", "bread", "volcanoes", "the Roman empire", "photosynthesis", "chess", "jazz", "rain",
          "bicycles", "the internet", "honey bees", "glaciers", "coffee", "black holes", "origami", "tides"]


def chat_prompts(n: int) -> list[list[dict]]:
    asks = ["Tell me three facts about {}.", "Write a short poem about {}, please, in a cheerful tone."]
    return [[{"role": "user", "content": asks[i % 2].format(TOPICS[i % len(TOPICS)])}] for i in range(n)]


@dataclass
class CompareOptions:
    model: str = ""                    # '' = bundled SmolLM2; random:<preset> for random weights
    dtype: str = "auto"
    device: str = "auto"
    attention_backend: str = "auto"    # pagedserve only
    num_prompts: int = 32
    max_tokens: int = 64
    seed: int = 0

    def argv(self) -> list[str]:
        return ["--model", self.model, "--dtype", self.dtype, "--device", self.device,
                "--attention-backend", self.attention_backend, "--num-prompts", str(self.num_prompts),
                "--max-tokens", str(self.max_tokens), "--seed", str(self.seed)]


# ------------------------------------------------------------------------ one system, in a child


def random_hf_state(hf_config, seed: int, dtype) -> dict:
    """Seeded HF-named random weights (normal, std 0.02; norms at 1) for ``hf_config``."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in skeleton.state_dict().items():
        if name == "lm_head.weight" and hf_config.tie_word_embeddings:
            continue
        t = torch.ones(p.shape) if name.endswith("norm.weight") else torch.randn(p.shape, generator=gen) * 0.02
        state[name] = t.to(dtype)
    return state


def load_checkpoint(model: str, dtype, seed: int = 0):
    """(transformers config, HF-named state dict): from the model's files, or random for random:<preset>."""
    from services.executor.model import preset_hf_config
    from services.executor.weights import load_hf_checkpoint
    from shared.model_path import resolve_model

    src = resolve_model(model)
    if src.random_preset is not None:
        hf_config = preset_hf_config(src.random_preset)
        return src.name, hf_config, random_hf_state(hf_config, seed, dtype)
    hf_config, state = load_hf_checkpoint(src, dtype=dtype)
    return src.name, hf_config, state


def encode_prompts(tokenizer, n: int) -> list[list[int]]:
    return [list(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False))
            for m in chat_prompts(n)]


def _timed(fn, device) -> float:
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def _run_pagedserve(name, hf_config, state, prompts, opts, device, dtype) -> float:
    from services.executor.model import ModelConfig
    from services.executor.weights import LoadedModel, build_model
    from services.executor.worker import Worker
    from services.offline import Engine
    from shared.config import EngineConfig, SchedulerConfig
    from shared.messages import AddRequest, SamplingParams

    cfg = ModelConfig.from_hf(hf_config)
    max_len = max(2048, max(map(len, prompts)) + opts.max_tokens)
    model = build_model(cfg, state, dtype=dtype, device=device, max_seq_len=max_len)
    econf = EngineConfig(model=opts.model, dtype=str(dtype).removeprefix("torch."), device=str(device),
                         attention_backend=opts.attention_backend, seed=opts.seed,
                         scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=PAGEDSERVE_BATCH_TOKENS,
                                                   max_model_len=max_len, max_waiting=1 << 30)).validate()
    engine = Engine(econf, Worker.from_loaded(LoadedModel(name, cfg, model, list(cfg.eos_token_ids)), econf))

    def batch(ps, max_tokens, tag):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        return [AddRequest(request_id=f"{tag}{i}", prompt_token_ids=p, sampling=params) for i, p in enumerate(ps)]

    engine.run(batch(prompts[:2], 4, "warmup-"))
    out = {}
    seconds = _timed(lambda: out.update(engine.run(batch(prompts, opts.max_tokens, ""))), device)
    produced = sum(len(s[0].token_ids) for s in out.values())
    if produced != len(prompts) * opts.max_tokens:
        raise RuntimeError(f"pagedserve produced {produced} tokens, expected {len(prompts) * opts.max_tokens}")
    if engine.scheduler.num_free_blocks != engine.ready.num_blocks:
        raise RuntimeError("pagedserve left KV blocks allocated after the run")
    return seconds


def _run_hf(system, hf_config, state, prompts, opts, device, dtype, pad_id) -> float:
    import torch
    from transformers import GenerationConfig

    from services.executor.weights import build_hf_reference

    hf = build_hf_reference(hf_config, state).to(device=device, dtype=dtype)
    expected = opts.max_tokens
    if system == "hf-padded":
        width = max(map(len, prompts))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)        # [N, W]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)  # [N, W]
        kw = dict(do_sample=False, pad_token_id=pad_id)
        out = {}
        with torch.inference_mode():
            hf.generate(input_ids=ids[:2], attention_mask=mask[:2], max_new_tokens=4, **kw)
            seconds = _timed(lambda: out.update(seqs=hf.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=expected, min_new_tokens=expected, **kw)), device)
        produced = [out["seqs"].shape[1] - width] * len(prompts)                                    # [N, W + T]
    else:
        # not under inference_mode: generate_batch runs its loop in a thread that writes to tensors
        # made here (an inference tensor there fails every request, and it returns empty results)
        # Its paged cache is sized to the workload (every request fits, as pagedserve's does): left to
        # itself it sizes the cache from the free memory and, on a CPU, spends ~15 s per call on that.
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        page = ContinuousBatchingConfig().page_size
        cb = ContinuousBatchingConfig(num_blocks=sum(-(-(len(p) + expected) // page) for p in prompts),
                                      max_batch_tokens=PAGEDSERVE_BATCH_TOKENS)
        cfg = GenerationConfig(max_new_tokens=expected, min_new_tokens=expected, do_sample=False,
                               eos_token_id=-1, pad_token_id=pad_id)
        warm = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=pad_id)
        hf.generate_batch(prompts[:2], generation_config=warm, continuous_batching_config=cb)
        out = {}
        seconds = _timed(lambda: out.update(hf.generate_batch(prompts, generation_config=cfg,
                                                              continuous_batching_config=cb)), device)
        produced = [len(r.generated_tokens) for r in out.values()]
    if len(produced) != len(prompts) or any(n != expected for n in produced):
        raise RuntimeError(f"{system} produced {sorted(produced)} tokens per prompt, expected {expected} "
                           f"for each of {len(prompts)}")
    return seconds


def run_system(system: str, opts: CompareOptions) -> dict:
    """Load, warm up and time one system in this process; returns its result record."""
    import torch

    from services.executor.worker import resolve_device, resolve_dtype
    from shared.tokenizer import load_tokenizer

    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    tok = load_tokenizer(opts.model)
    prompts = encode_prompts(tok, opts.num_prompts)
    name, hf_config, state = load_checkpoint(opts.model, dtype, opts.seed)
    if hf_config.vocab_size < len(tok):     # a small random preset: fold the ids into its vocabulary
        prompts = [[t % hf_config.vocab_size for t in p] for p in prompts]
    if system == "pagedserve":
        seconds = _run_pagedserve(name, hf_config, state, prompts, opts, device, dtype)
    else:
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        seconds = _run_hf(system, hf_config, state, prompts, opts, device, dtype, pad_id)
    tokens = opts.num_prompts * opts.max_tokens
    runtime = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        runtime += f", {torch.cuda.get_device_name(device)}"
    return {"system": system, "output_tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds,
            "model": name, "dtype": str(dtype).removeprefix("torch."), "device": str(device), "runtime": runtime}


# ------------------------------------------------------------------------ the parent: all systems


def run_compare(systems: list[str] | tuple[str, ...], opts: CompareOptions, quiet: bool = False,
                repeat: int = 1) -> dict:
    """Each system in its own child process, in turn, ``repeat`` rounds (every other round in
    reverse order, so a drift of the machine's speed hits every system alike); returns the
    report (errors recorded, not raised)."""
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    with tempfile.TemporaryDirectory(prefix="pagedserve-compare-") as tmp:
        for round_no in range(repeat):
            for system in (systems if round_no % 2 == 0 else list(reversed(systems))):
                runs[system].append(_run_child(system, opts, tmp, quiet))
    return make_report(runs, opts)


def _run_child(system: str, opts: CompareOptions, tmp: str, quiet: bool) -> dict:
    path = os.path.join(tmp, f"{system}.json")
    cmd = [sys.executable, "-m", "services.cli", "bench", "compare", "--only", system,
           "--result-file", path, *opts.argv()]
    if not quiet:
        print(f"running {system} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else 2,   # 2: our stderr
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode == 0 and os.path.exists(path):
        with open(path) as f:
            result = json.load(f)
        os.remove(path)
        return result
    tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]   # the exception line
    return {"system": system, "error": f"exit code {proc.returncode}: {tail[0]}"}


def summarize(runs: list[dict]) -> dict:
    """One system's runs -> its median run, with every run's tok/s; the first error if any failed."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    by_speed = sorted(runs, key=lambda r: r["tok_per_s"])
    return {**by_speed[len(by_speed) // 2], "tok_per_s": statistics.median(r["tok_per_s"] for r in runs),
            "seconds": statistics.median(r["seconds"] for r in runs),
            "runs_tok_per_s": [r["tok_per_s"] for r in runs]}


def ratios(runs: dict[str, list[dict]]) -> dict[str, dict | None]:
    """pagedserve tok/s over each other system's, round by round: the median and the range of
    those ratios (None where either one failed)."""
    base = runs.get("pagedserve", [])
    out: dict[str, dict | None] = {}
    for name, rs in runs.items():
        if name == "pagedserve":
            continue
        pairs = [p["tok_per_s"] / r["tok_per_s"] for p, r in zip(base, rs)
                 if p.get("tok_per_s") and r.get("tok_per_s")]
        ok = pairs and len(pairs) == len(rs) == len(base)
        out[name] = {"median": statistics.median(pairs), "min": min(pairs), "max": max(pairs)} if ok else None
    return out


def make_report(runs: dict[str, list[dict]], opts: CompareOptions) -> dict:
    """``runs``: per system, one result record per round (from ``run_system``, or an error)."""
    results = {name: summarize(rs) for name, rs in runs.items()}
    ok = next((r for r in results.values() if "runtime" in r), {})
    return {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {ok.get('runtime', '?')}",
        "model": ok.get("model", opts.model or "default"), "dtype": ok.get("dtype", opts.dtype),
        "device": ok.get("device", opts.device), "options": asdict(opts),
        "rounds": max((len(rs) for rs in runs.values()), default=0),
        "systems": results, "ratio_of_pagedserve_to": ratios(runs),
    }


def format_table(report: dict) -> str:
    """Medians over the rounds; with several rounds, the range of tok/s and of the round ratios too."""
    many = report["rounds"] > 1
    rows = ["| system | output tok/s | seconds | pagedserve / system |", "|---|---|---|---|"]
    rat = report["ratio_of_pagedserve_to"]
    for name, r in report["systems"].items():
        if "error" in r:
            rows.append(f"| {LABELS.get(name, name)} | failed: {r['error']} | | |")
            continue
        speed = f"{r['tok_per_s']:.1f}"
        if many:
            speed += f" ({min(r['runs_tok_per_s']):.0f}–{max(r['runs_tok_per_s']):.0f})"
        ratio = "—" if name == "pagedserve" else "n/a"
        if rat.get(name):
            ratio = f"{rat[name]['median']:.2f}x" + (f" ({rat[name]['min']:.2f}–{rat[name]['max']:.2f})"
                                                     if many else "")
        rows.append(f"| {LABELS.get(name, name)} | {speed} | {r['seconds']:.2f} | {ratio} |")
    o = report["options"]
    head = (f"{report['model']} ({report['dtype']}, {report['device']}), {o['num_prompts']} prompts x "
            f"{o['max_tokens']} new tokens, greedy, EOS ignored; {report['machine']}")
    if many:
        head += f"; median of {report['rounds']} rounds (range in brackets)"
    return head + "\n" + "\n".join(rows)


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = {n: r for n, r in report["systems"].items() if "tok_per_s" in r}
    names = list(done)
    values = [done[n]["tok_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = ["tab:blue" if n == "pagedserve" else "tab:gray" for n in names]
    bars = ax.bar([LABELS.get(n, n) for n in names], values, color=colors)
    for bar, name in zip(bars, names):
        ratio = report["ratio_of_pagedserve_to"].get(name)
        note = f"{bar.get_height():.0f} tok/s" + (f"\npagedserve {ratio['median']:.2f}x" if ratio else "")
        ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=9)
    o = report["options"]
    ax.set_ylabel("output tokens / s")
    ax.set_ylim(0, max(values, default=1) * 1.3)
    ax.set_title(f"{report['model']} ({report['dtype']}, {report['device']}): "
                 f"{o['num_prompts']} prompts x {o['max_tokens']} tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, "compare")            # --model, --dtype, --device, --attention-backend, --seed
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {', '.join(SYSTEMS)}")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of every system (alternating order); the report gives medians and ranges")
    p.add_argument("--out", default="", help="directory for compare.json and compare.png")
    p.add_argument("--only", choices=SYSTEMS, help=argparse.SUPPRESS)           # child process mode
    p.add_argument("--result-file", default="", help=argparse.SUPPRESS)


def options_from(args: argparse.Namespace) -> CompareOptions:
    if args.num_prompts < 1 or args.max_tokens < 1 or args.repeat < 1:
        raise ValueError("--num-prompts, --max-tokens and --repeat must be >= 1")
    return CompareOptions(args.model, args.dtype, args.device, args.attention_backend, args.num_prompts,
                          args.max_tokens, args.seed)


def run(args: argparse.Namespace) -> int:
    try:
        opts = options_from(args)
        systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        unknown = [s for s in systems if s not in SYSTEMS]
        if unknown or not systems:
            raise ValueError(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    except ValueError as e:
        print(f"pagedserve bench compare: {e}", file=sys.stderr)
        return 2
    if args.only:                      # child: one system, result to a file
        result = run_system(args.only, opts)
        with open(args.result_file or os.devnull, "w") as f:
            json.dump(result, f)
        print(f"{args.only}: {result['tok_per_s']:.1f} tok/s", file=sys.stderr)
        return 0
    report = run_compare(systems, opts, repeat=args.repeat)
    print(format_table(report))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        report["plot"] = os.path.join(args.out, "compare.png")
        plot(report, report["plot"])
        with open(os.path.join(args.out, "compare.json"), "w") as f:
            json.dump(report, f, indent=2)
    return 0 if all("error" not in r for r in report["systems"].values()) else 1
