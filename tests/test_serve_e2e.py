"""`pagedserve serve` end to end: three real processes on ipc sockets, the default model, the
official openai client, then SIGTERM shuts everything down and removes the sockets."""
import signal

import pytest

from tests.serve_harness import start_serve, wait_healthy

openai = pytest.importorskip("openai")


def test_serve_answers_and_shuts_down_cleanly(default_model_source, tmp_path):
    proc, base, log_path = start_serve(["--num-blocks", "128", "--max-model-len", "512"], tmp_path)
    try:
        wait_healthy(base, proc, log_path)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        out = client.completions.create(model=default_model_source.name, prompt="The capital of France is",
                                        max_tokens=4, temperature=0)
        assert out.usage.completion_tokens == 4 and out.choices[0].text
        assert [m.id for m in client.models.list().data] == [default_model_source.name]
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    assert rc == 0
    assert not list(tmp_path.glob("pagedserve-*")), "socket directory left behind"
