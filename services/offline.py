"""Offline batch generation: scheduler and executor in one process, no sockets.

``LLM(...).generate(prompts, params)`` is the Python face (like vLLM's ``LLM.generate``);
``pagedserve generate`` is the command-line face. The step loop is the same one the services
run over ZeroMQ (``step_loop.run_step``), and the executor's limits are merged into the config by
the same ``resolve_with_executor``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

from services.scheduler.step_loop import StepFailed, run_step
from shared.config import Config, EngineConfig, add_options, config_from_args, resolve_with_executor
from shared.messages import AddRequest, GrammarSpec, RequestOutput, SamplingParams, TokenLogprobs


@dataclass
class Sample:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None      # beam search: the hypothesis' sum of logprobs


@dataclass
class Completion:
    prompt_token_ids: list[int]
    samples: list[Sample]
    num_cached_tokens: int = 0


class Engine:
    """One scheduler driving one in-process worker."""

    def __init__(self, config: EngineConfig, worker=None, tokenizer=None):
        """``tokenizer``: the model's (HF fast) tokenizer, for structured outputs; None: none."""
        from services.executor.worker import Worker, start_worker
        from services.scheduler.grammar import GrammarBackend, llguidance_tokenizer
        from services.scheduler.scheduler import Scheduler

        self.group = None            # tensor parallel: this process is rank 0 (parallel.py)
        if worker is None and config.tensor_parallel_size > 1:
            worker, self.group = start_worker(Config(engine=config))
        self.worker = worker if worker is not None else Worker(config)
        self.ready = r = self.worker.ready()
        sched, cache = resolve_with_executor(config.scheduler, config.cache, self.ready)
        grammars = None if tokenizer is None else GrammarBackend(
            lambda: llguidance_tokenizer(tokenizer, r.vocab_size, r.eos_token_ids), r.vocab_size,
            sched.grammar_cache_size)
        self.scheduler = Scheduler(sched, cache, eos_token_ids=self.ready.eos_token_ids, grammars=grammars)

    def close(self) -> None:
        """End the tensor-parallel group's other ranks (nothing to do without one)."""
        if self.group is not None:
            self.group.close()
            self.group = None

    def add(self, request: AddRequest) -> None:
        error = self.scheduler.add_request(request)
        if error is not None:
            raise ValueError(f"request {request.request_id}: {error.message}")

    def step(self) -> list[RequestOutput]:
        outputs = run_step(self.scheduler, self.worker.execute)
        if isinstance(outputs, StepFailed):
            raise RuntimeError(outputs.message)
        return outputs or []

    def run(self, requests: list[AddRequest], progress: bool = False) -> dict[str, list[Sample]]:
        """Run requests to completion; returns samples per request id."""
        from tqdm import tqdm

        samples = {r.request_id: [Sample() for _ in range(r.sampling.n)] for r in requests}
        for r in requests:
            self.add(r)
        total = sum(len(s) for s in samples.values())
        with tqdm(total=total, desc="generating", unit="seq", disable=not progress, file=sys.stderr) as bar:
            while self.scheduler.has_unfinished():
                outputs = self.step()
                for out in outputs:
                    sample = samples[out.request_id][out.index]
                    sample.token_ids.extend(out.token_ids)
                    if out.logprobs:
                        sample.logprobs = (sample.logprobs or []) + list(out.logprobs)
                    if out.cumulative_logprob is not None:
                        sample.cumulative_logprob = out.cumulative_logprob
                    if out.finish_reason is not None:
                        sample.finish_reason = out.finish_reason
                        bar.update()
        return samples


def load_tokenizer(model: str = ""):
    from transformers import AutoTokenizer

    from shared.model_path import resolve_model

    src = resolve_model(model)
    if src.random_preset:
        raise ValueError("random-weight models have no tokenizer: pass token ids")
    return AutoTokenizer.from_pretrained(src.directory, gguf_file=src.gguf_file)


class LLM:
    """vLLM-style offline entry point: ``LLM().generate(["Hello"], SamplingParams(max_tokens=8))``."""

    def __init__(self, config: EngineConfig | None = None, worker=None, tokenizer=None):
        self.config = (config or EngineConfig()).validate()
        self.tokenizer = tokenizer
        if self.tokenizer is None and not self.config.model.startswith("random:"):
            self.tokenizer = load_tokenizer(self.config.model)
        self.engine = Engine(self.config, worker, self.tokenizer)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False,
                 grammar: GrammarSpec | list[GrammarSpec | None] | None = None) -> list[Completion]:
        """``grammar``: a structured-output constraint for every prompt, or one per prompt
        (shared/grammar.py checks each; ValueError names what is wrong)."""
        from shared.grammar import check

        params = params if params is not None else SamplingParams()
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        grammars = grammar if isinstance(grammar, list) else [grammar] * len(prompts)
        if len(per_prompt) != len(prompts) or len(grammars) != len(prompts):
            raise ValueError(f"{len(per_prompt)} sampling params and {len(grammars)} grammars "
                             f"for {len(prompts)} prompts")
        for g in {g for g in grammars if g is not None}:
            check(g)
        ids = [p if isinstance(p, list) else self.tokenizer.encode(p) for p in prompts]
        requests = [AddRequest(request_id=str(i), prompt_token_ids=t, sampling=s, grammar=g)
                    for i, (t, s, g) in enumerate(zip(ids, per_prompt, grammars))]
        samples = self.engine.run(requests, progress=progress)
        completions = []
        for r in requests:
            got = samples[r.request_id]
            if self.tokenizer is not None:
                for s in got:
                    s.text = self.tokenizer.decode(s.token_ids, skip_special_tokens=True)
            completions.append(Completion(r.prompt_token_ids, got))
        return completions


    def beam_search(self, prompts: list[str] | list[list[int]], beam_width: int, max_tokens: int = 16,
                    length_penalty: float = 1.0, early_stopping: bool = False,
                    progress: bool = False) -> list[Completion]:
        """Beam search per prompt, as HF ``generate(num_beams=beam_width,
        num_return_sequences=beam_width, do_sample=False, ...)``: each Completion's samples are
        the ``beam_width`` hypotheses, best first, with their ``cumulative_logprob``."""
        params = SamplingParams(n=beam_width, max_tokens=max_tokens, temperature=0.0, use_beam_search=True,
                                length_penalty=length_penalty, early_stopping=early_stopping)
        return self.generate(prompts, params, progress=progress)


# ------------------------------------------------------------------------------------------ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, "generate")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--input", help='JSONL file: {"prompt": "..."} or {"messages": [...]} per line')
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object per input, in input order")
    beam = p.add_argument_group("beam search (greedy over K beams; K hypotheses per input, best first)")
    beam.add_argument("--beam-width", type=int, default=None, metavar="K", help="beam search with K beams")
    beam.add_argument("--length-penalty", type=float, default=None,
                      help="a hypothesis scores sum(logprobs) / length ** L (default 1.0)")
    beam.add_argument("--early-stopping", action="store_true", help="stop once K hypotheses are finished")
    constraint = p.add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", metavar="FILE", help="constrain every output to this JSON Schema")
    constraint.add_argument("--regex", help="constrain every output to this regular expression")
    constraint.add_argument("--grammar", metavar="FILE", help="constrain every output to this Lark grammar")


INPUT_KEYS = ("prompt", "messages")


def _fail(message: str) -> SystemExit:
    """A clear one-line error exit (status 1) instead of a traceback."""
    return SystemExit(f"pagedserve generate: {message}")


def _check_item(obj, where: str) -> dict:
    """One input line: exactly one of {"prompt": str} or {"messages": [{"role", "content"}, ...]}."""
    if not isinstance(obj, dict):
        raise _fail(f'{where}: expected a JSON object, got {type(obj).__name__}')
    unknown = sorted(set(obj) - set(INPUT_KEYS))
    if unknown:
        raise _fail(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} (allowed: prompt, messages)")
    if len(obj) != 1:
        raise _fail(f'{where}: expected one of {{"prompt": ...}} or {{"messages": [...]}}')
    if "prompt" in obj and not isinstance(obj["prompt"], str):
        raise _fail(f"{where}: prompt must be a string")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise _fail(f'{where}: messages must be a non-empty list of {{"role": str, "content": str}}')
    return obj


def read_inputs(args: argparse.Namespace) -> list[dict]:
    """The inputs in order; bad input exits with a message naming the file and line."""
    if args.prompt:
        return [{"prompt": p} for p in args.prompt]
    try:
        f = open(args.input, encoding="utf-8")
    except OSError as e:
        raise _fail(f"cannot read {args.input}: {e.strerror}")
    items = []
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _fail(f"{args.input}:{lineno}: not JSON ({e.msg})")
            items.append(_check_item(obj, f"{args.input}:{lineno}"))
    if not items:
        raise _fail(f"{args.input}: no inputs")
    return items


def read_grammar(args: argparse.Namespace) -> GrammarSpec | None:
    """The --json-schema / --regex / --grammar constraint, checked (before any model loads)."""
    from shared.grammar import GrammarError, check

    if args.regex is not None:
        spec = GrammarSpec("regex", args.regex)
    elif args.json_schema or args.grammar:
        path = args.json_schema or args.grammar
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise _fail(f"cannot read {path}: {e.strerror}")
        spec = GrammarSpec("json_schema" if args.json_schema else "lark", text)
    else:
        return None
    try:
        check(spec)
    except GrammarError as e:
        raise _fail(f"{'--regex' if args.regex is not None else path}: {e}")
    return spec


def check_beam_options(args: argparse.Namespace) -> None:
    """Beam search is greedy over beams: sampling options and constraints make no sense with it."""
    if args.beam_width is None:
        given = [f for f, on in (("--length-penalty", args.length_penalty is not None),
                                 ("--early-stopping", args.early_stopping)) if on]
        if given:
            raise _fail(f"{', '.join(given)}: beam search options, given without --beam-width")
        return
    if args.beam_width < 1:
        raise _fail(f"--beam-width must be at least 1, got {args.beam_width}")
    clashes = [flag for flag, on in (
        ("--temperature", args.temperature > 0), ("--n", args.n != 1), ("--top-p", args.top_p != 1.0),
        ("--top-k", args.top_k != -1), ("--seed", args.seed is not None), ("--ignore-eos", args.ignore_eos),
        ("--json-schema", args.json_schema is not None), ("--regex", args.regex is not None),
        ("--grammar", args.grammar is not None)) if on]
    if clashes:
        raise _fail(f"--beam-width does not combine with {', '.join(clashes)} (beam search is greedy "
                    "over K beams and returns K hypotheses)")


def run(args: argparse.Namespace, worker=None, tokenizer=None) -> int:
    """`pagedserve generate`. ``worker`` / ``tokenizer``: already loaded ones (tests); by default
    both are loaded from ``--model``. Inputs are checked before anything is loaded."""
    import msgspec

    check_beam_options(args)
    items = read_inputs(args)
    grammar = read_grammar(args)
    beams = args.beam_width is not None
    try:
        if beams:
            params = msgspec.convert(dict(max_tokens=args.max_tokens, temperature=0.0, n=args.beam_width,
                                          use_beam_search=True, early_stopping=args.early_stopping,
                                          length_penalty=1.0 if args.length_penalty is None else args.length_penalty),
                                     SamplingParams)
        else:
            params = msgspec.convert(dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                          top_k=args.top_k, seed=args.seed, n=args.n, ignore_eos=args.ignore_eos),
                                     SamplingParams)
        config = config_from_args(args, "generate").engine
        config.scheduler.max_waiting = 1 << 30            # every input is queued at once
    except (msgspec.ValidationError, ValueError) as e:
        raise _fail(str(e))
    from services.executor.model_config import UnsupportedModel
    try:
        llm = LLM(config, worker=worker, tokenizer=tokenizer)
    except (UnsupportedModel, FileNotFoundError) as e:     # a model that is not served: say which and why
        raise _fail(str(e))
    prompts = [llm.encode_chat(it["messages"]) if "messages" in it else it["prompt"] for it in items]
    try:
        completions = llm.generate(prompts, params, progress=len(prompts) > 1, grammar=grammar)
    except ValueError as e:                  # a request the scheduler refuses (e.g. longer than the model)
        raise _fail(str(e))
    finally:
        llm.engine.close()                   # the other tensor-parallel ranks, if any
    for item, c in zip(items, completions):
        if args.json:
            texts = [s.text for s in c.samples]
            ids = [s.token_ids for s in c.samples]
            reasons = [s.finish_reason for s in c.samples]
            one = args.n == 1 and not beams          # beams: always lists, best first
            row = {**item, "text": texts[0] if one else texts, "token_ids": ids[0] if one else ids,
                   "finish_reason": reasons[0] if one else reasons}
            if beams:
                row["cumulative_logprob"] = [s.cumulative_logprob for s in c.samples]
            print(json.dumps(row, ensure_ascii=False))
        else:
            for s in c.samples:
                print(s.text)
                print("-" * 40)
    return 0
