"""Beam search over HTTP end to end: `pagedserve serve` on the default model, the official openai
client with vLLM's extras (``use_beam_search``, ``n`` = beam width): n choices, best first, the
same hypotheses as ``LLM.beam_search`` in process; streaming with beams is a 400."""
from __future__ import annotations

import pytest

from services.offline import LLM
from shared.config import EngineConfig

openai = pytest.importorskip("openai")

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MAX_TOKENS = 8


@pytest.fixture
def server(default_server):
    return default_server


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


def test_completions_beams_equal_the_offline_beam_search(server, client, default_worker_factory, hf_tokenizer):
    llm = LLM(EngineConfig(), worker=default_worker_factory(), tokenizer=hf_tokenizer)
    for prompt, want in zip(PROMPTS, llm.beam_search(PROMPTS, 2, MAX_TOKENS)):
        out = client.completions.create(model=server[1], prompt=prompt, max_tokens=MAX_TOKENS,
                                        extra_body={"use_beam_search": True, "n": 2})
        assert [c.index for c in out.choices] == [0, 1]
        assert [c.finish_reason for c in out.choices] == [s.finish_reason for s in want.samples]
        assert [c.text for c in out.choices] == [s.text for s in want.samples]
        assert out.usage.completion_tokens == sum(len(s.token_ids) for s in want.samples)


def test_chat_beams_and_a_streamed_beam_request_is_refused(server, client):
    ask = [{"role": "user", "content": "Name a colour."}]
    out = client.chat.completions.create(model=server[1], messages=ask, max_tokens=MAX_TOKENS,
                                         extra_body={"use_beam_search": True, "n": 3, "length_penalty": 0.5})
    assert len(out.choices) == 3 and all(c.finish_reason in ("stop", "length") for c in out.choices)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server[1], messages=ask, max_tokens=4, stream=True,
                                       extra_body={"use_beam_search": True, "n": 2})
    assert e.value.body["param"] == "stream"
