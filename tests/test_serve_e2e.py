"""`pagedserve serve` end to end: three real processes on ipc sockets, the default model, the
official openai client, then SIGTERM shuts everything down and removes the sockets."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

openai = pytest.importorskip("openai")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_and_shuts_down_cleanly(default_model_source, tmp_path):
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--port", str(port),
                             "--num-blocks", "128", "--max-model-len", "512"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("serve did not become healthy")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        out = client.completions.create(model=default_model_source.name, prompt="The capital of France is",
                                        max_tokens=4, temperature=0)
        assert out.usage.completion_tokens == 4 and out.choices[0].text
        assert [m.id for m in client.models.list().data] == [default_model_source.name]
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    assert rc == 0
    assert not list(tmp_path.glob("pagedserve-*")), "socket directory left behind"
