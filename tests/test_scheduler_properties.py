"""Property test: random add / abort / abort-one-sample / step sequences on tiny pools keep the
block accounting, the prefix cache and the step protocol consistent, and always drain to an empty
pool; with a random sliding window, every sequence holds exactly the blocks its window reads."""
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from services.scheduler.scheduler import Scheduler
from shared.config import CacheConfig, SchedulerConfig
from shared.messages import AddRequest, SamplingParams
from tests.scheduler_harness import CheckedFakeExecutor

BASES = [list(range(10, 60)), list(range(100, 150))]     # shared prefixes make cache hits likely
EOS = 3


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(block_size=st.sampled_from([1, 2, 4]), num_blocks=st.integers(4, 16),
                num_host_blocks=st.sampled_from([0, 3, 16]), swap=st.booleans(),
                budget=st.integers(3, 24), chunked=st.booleans(), caching=st.booleans(),
                max_num_seqs=st.integers(1, 6), watermark=st.sampled_from([0.0, 0.2]),
                window=st.sampled_from([0, 0, 1, 2, 3, 5, 8]))
    def setup(self, block_size, num_blocks, num_host_blocks, swap, budget, chunked, caching,
              max_num_seqs, watermark, window):
        max_model_len = 24
        sched = SchedulerConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len, max_waiting=6,
                                max_num_batched_tokens=budget if chunked else max(budget, max_model_len),
                                preemption_mode="swap" if swap else "recompute",
                                enable_chunked_prefill=chunked).validate()
        cache = CacheConfig(block_size=block_size, num_blocks=num_blocks, num_host_blocks=num_host_blocks,
                            watermark=watermark, enable_prefix_caching=caching, sliding_window=window).validate()
        if window:
            event("sliding window")
        self.s = Scheduler(sched, cache, eos_token_ids=[EOS])
        self.ex = CheckedFakeExecutor(self.s, roundtrip=False)
        self.cap = min(max_model_len, num_blocks * block_size)
        self.next_id = 0
        self.prompts: dict[str, list[int]] = {}
        self.outputs: dict[tuple[str, int], list[int]] = {}
        self.done: set[tuple[str, int]] = set()
        self.accepted: dict[str, int] = {}                 # request id -> n, until aborted
        self.all_prompts: dict[str, list[int]] = {}        # every accepted prompt, never dropped
        self.salts: dict[str, object] = {}                 # request id -> its cache_salt

    # ------------------------------------------------------------------------------ rules

    @rule(base=st.sampled_from([0, 1]), shared=st.integers(0, 20), suffix=st.lists(st.integers(0, 500), max_size=6),
          n=st.integers(1, 3), max_tokens=st.integers(1, 8), ignore_eos=st.booleans(),
          salt=st.sampled_from([None, None, "a", "b"]))
    def add(self, base, shared, suffix, n, max_tokens, ignore_eos, salt):
        prompt = BASES[base][:shared] + suffix
        rid = f"r{self.next_id}"
        self.next_id += 1
        waiting = self.s.num_waiting
        err = self.s.add_request(AddRequest(request_id=rid, prompt_token_ids=prompt, cache_salt=salt,
                                            sampling=SamplingParams(n=n, max_tokens=max_tokens,
                                                                    ignore_eos=ignore_eos)))
        if not prompt or n > self.s.config.max_num_seqs:
            assert err is not None and err.code == "invalid"
        elif len(prompt) >= self.cap:
            assert err is not None and err.code == "too_long"
        elif waiting >= self.s.config.max_waiting:
            assert err is not None and err.code == "queue_full"
        else:
            assert err is None
            self.prompts[rid] = prompt
            self.all_prompts[rid] = prompt
            self.salts[rid] = salt
            self.accepted[rid] = n

    @precondition(lambda self: self.prompts)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.prompts)))
        self.s.abort_request(rid)
        del self.prompts[rid]
        del self.accepted[rid]

    @precondition(lambda self: self.prompts)
    @rule(data=st.data(), in_flight=st.booleans())
    def abort_one_sample(self, data, in_flight):
        """Finish one sample (waiting, before or after the fork, running, swapped, or with a step
        in flight): it reports "abort" once, unless it had finished already; its siblings go on."""
        rid = data.draw(st.sampled_from(sorted(self.prompts)))
        index = data.draw(st.integers(0, self.accepted[rid] - 1))
        if in_flight:
            self._step(during=lambda: self._finish_sample(rid, index))
        else:
            self._finish_sample(rid, index)

    def _finish_sample(self, rid, index):
        if rid not in self.s.requests:                     # ended in this very step
            return
        out = self.s.finish_sample(rid, index)
        key = (rid, index)
        assert (out is None) == (key in self.done), (key, out)
        if out is not None:
            assert (out.request_id, out.index, out.token_ids, out.finish_reason) == (rid, index, [], "abort")
            event("sample finished early" if key in self.outputs else "sample struck before its first token")
            self.done.add(key)
        if rid not in self.s.requests:
            event("request ended by its last sample")
            del self.prompts[rid]

    @rule()
    def step(self):
        self._step()

    @precondition(lambda self: self.prompts)
    @rule(data=st.data())
    def abort_while_step_in_flight(self, data):
        rid = data.draw(st.sampled_from(sorted(self.prompts)))
        self._step(abort=rid)

    @rule(num_blocks=st.integers(4, 16), in_flight=st.booleans())
    def executor_lost(self, num_blocks, in_flight):
        """The executor dies (maybe with a step sent and never answered); a new one, maybe with
        another pool size, takes over: everything is recomputed or dropped with an error."""
        if in_flight:
            self.s.schedule()
        old = self.s.cache_config
        new = CacheConfig(block_size=old.block_size, num_blocks=num_blocks, num_host_blocks=old.num_host_blocks,
                          watermark=old.watermark, enable_prefix_caching=old.enable_prefix_caching,
                          sliding_window=old.sliding_window).validate()
        errors = self.s.reset_for_new_executor(cache_config=new)
        self.ex = CheckedFakeExecutor(self.s, roundtrip=False)
        self.cap = min(self.s.config.max_model_len, num_blocks * old.block_size)
        assert not self.s.running and not self.s.swapped and self.s.num_free_blocks == num_blocks
        for e in errors:
            assert e.code == "executor_error" and not self.s.has_request(e.request_id)
            self.prompts.pop(e.request_id, None)
            self.accepted.pop(e.request_id, None)
        if errors:
            event("executor lost: requests dropped")

    @rule()
    def abort_all_frees_everything(self):
        for rid in list(self.prompts):
            self.s.abort_request(rid)
        self.prompts.clear()
        self.accepted.clear()
        self._check_drained()

    def _step(self, abort=None, during=None):
        plan = self.s.schedule()
        if plan is None:
            assert not self.s.has_unfinished(), "work left but nothing scheduled"
            return
        for name in ("forks", "copies", "preempted", "swap_out", "swap_in"):
            if getattr(plan, name):
                event(f"plan has {name}")
        if any(n.num_computed for n in plan.new):
            event("prefix hit")
        bm = self.s.block_manager
        if any(bm.num_released(s) for s in plan.run_seq_ids):
            event("runs with released blocks")
        result = self.ex.execute(plan)
        if abort is not None:
            self.s.abort_request(abort)
            del self.prompts[abort]
            del self.accepted[abort]
        if during is not None:
            during()
        for out in self.s.update(plan, result):
            key = (out.request_id, out.index)
            assert key not in self.done
            self.outputs.setdefault(key, []).extend(out.token_ids)
            if out.finish_reason is not None:
                self.done.add(key)
        for rid in list(self.prompts):
            if rid not in self.s.requests:
                del self.prompts[rid]

    # ------------------------------------------------------------------------------ invariants

    @invariant()
    def blocks_are_free_or_used_by_tables(self):
        if not hasattr(self, "s"):
            return
        self.s.block_manager.check_invariants()

    @invariant()
    def cached_blocks_hold_their_prefix(self):
        if not hasattr(self, "s"):
            return
        bm, bs = self.s.block_manager, self.s.block_size
        expected: dict[bytes, list[int]] = {}              # chain digest -> the whole prefix
        seqs = [(rid, self.all_prompts[rid] + toks) for (rid, _), toks in self.outputs.items()]
        seqs += list(self.all_prompts.items())              # prompts aborted before sampling
        for rid, tokens in seqs:                            # keyed under its own salt only
            chain = bm.hash_chain(self.salts[rid])
            for i in range(len(tokens) // bs):
                expected[chain.digest(i, tokens)] = tokens[:(i + 1) * bs]
        for h, block_id in bm.cached_block_ids().items():  # (each block's own hash: check_invariants)
            prefix = expected[h]                           # every cached block came from these
            i = len(prefix) // bs - 1
            assert self.ex.kv[block_id] == prefix[i * bs:(i + 1) * bs]

    @invariant()
    def executor_mirrors_scheduler(self):
        if not hasattr(self, "s"):
            return
        self.ex.check_tables()
        for sid, seq in self.s.seqs.items():
            if seq.status in ("running", "swapped"):
                st_ = self.ex.seqs[sid]
                assert st_.prompt + st_.outputs == seq.token_ids
                assert st_.computed == seq.num_computed

    @invariant()
    def windowed_sequences_hold_just_their_window(self):
        """Between steps a sequence has released every block wholly before ``num_computed - W + 1``
        (the executor agrees on where its window starts) and holds the others: at most
        ``ceil((W - 1) / block_size) + 1`` blocks."""
        if not hasattr(self, "s") or not self.s.block_manager.sliding_window:
            return
        bm, bs = self.s.block_manager, self.s.block_size
        w = bm.sliding_window
        for sid, seq in self.s.seqs.items():
            if seq.status not in ("running", "swapped"):
                assert bm.num_released(sid) == 0
                continue
            dead = max((seq.num_computed - w + 1) // bs, 0)
            assert bm.num_released(sid) == dead == self.ex.seqs[sid].live_from
            held = len(bm.host_block_ids(sid)) if seq.status == "swapped" else bm.num_held(sid)
            assert held <= -(-(w - 1) // bs) + 1, (sid, seq.num_computed, held)

    def _check_drained(self):
        s = self.s
        assert not s.has_unfinished()
        assert s.num_free_blocks == s.block_manager.num_blocks
        assert s.block_manager.host.num_free == s.block_manager.host.num_blocks
        assert s.block_manager.num_seqs == 0 and not s.seqs

    def teardown(self):
        if not hasattr(self, "s"):
            return
        for _ in range(500):                               # everything left runs to completion
            if not self.s.has_unfinished():
                break
            self._step()
        self._check_drained()
        for rid, n in self.accepted.items():               # every sample of every request finished
            assert all((rid, i) in self.done and len(self.outputs.get((rid, i), [])) <= 8 for i in range(n))


SchedulerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                              suppress_health_check=[HealthCheck.too_slow])
TestSchedulerMachine = SchedulerMachine.TestCase


class WindowedSchedulerMachine(SchedulerMachine):
    """The same machine, always with a sliding window, on longer sequences (so blocks leave it)."""

    @initialize(block_size=st.sampled_from([1, 2, 4]), num_blocks=st.integers(4, 16),
                num_host_blocks=st.sampled_from([0, 3, 16]), swap=st.booleans(),
                budget=st.integers(3, 24), chunked=st.booleans(), caching=st.booleans(),
                max_num_seqs=st.integers(1, 6), watermark=st.sampled_from([0.0, 0.2]),
                window=st.integers(1, 9))
    def setup(self, **kw):
        SchedulerMachine.setup(self, **kw)


WindowedSchedulerMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None,
                                                      suppress_health_check=[HealthCheck.too_slow])
TestWindowedSchedulerMachine = WindowedSchedulerMachine.TestCase
