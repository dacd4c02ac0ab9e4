"""The configuration end to end, with real processes: flags given to `pagedserve serve` reach the
executor (issue 13's two failures), and compose.yaml's three commands serve a completion over TCP."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import yaml
import zmq

from services.launcher import stop_all
from shared import transport
from shared.messages import ExecutorHello, ExecutorReady
from tests.serve_harness import ROOT, free_port, start_serve, wait_healthy

pytestmark = pytest.mark.timeout(240)


def _handshake(addr: str, block_size: int = 16) -> ExecutorReady:
    """Ask a running executor for its ExecutorReady (a hello only clears sequence state)."""
    ctx = zmq.Context()
    sock = transport.dealer(ctx, addr)
    try:
        transport.send(sock, ExecutorHello(block_size=block_size))
        assert sock.poll(30_000), "no answer to the hello"
        return transport.recv(sock)
    finally:
        sock.close(linger=0)
        ctx.term()


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL past the grace (the launcher's own stop)."""
    stop_all({"gateway": proc}, grace=30)


def _executor_ready(tmp_path) -> ExecutorReady:
    """The handshake of the executor a serve under ``tmp_path`` started."""
    [sock_dir] = [d for d in Path(tmp_path).iterdir() if d.name.startswith("pagedserve-")]
    return _handshake(transport.ipc_address(str(sock_dir), "executor"))


def test_serve_max_num_batched_tokens_reaches_the_executor(tmp_path):
    """Three concurrent ~1300-token prompts under `--max-num-batched-tokens 4096` all complete;
    the executor used to keep 2048 and answer the packed step with an error (500)."""
    proc, base, log_path = start_serve(["random:tiny", "--device", "cpu", "--num-blocks", "300",
                                        "--max-num-batched-tokens", "4096"], tmp_path)
    try:
        wait_healthy(base, proc, log_path)
        replies: list[httpx.Response] = []
        barrier = threading.Barrier(3)

        def complete(i: int) -> None:
            prompt = [1 + (i * 131 + k * 7) % 500 for k in range(1300)]
            barrier.wait()
            replies.append(httpx.post(f"{base}/v1/completions", json={"prompt": prompt, "max_tokens": 2},
                                      timeout=120))

        threads = [threading.Thread(target=complete, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        assert [r.status_code for r in replies] == [200] * 3, [r.text for r in replies]
        assert _executor_ready(tmp_path).max_num_batched_tokens == 4096
    finally:
        _stop(proc)


def test_serve_num_host_blocks_reaches_the_executor(tmp_path):
    """`--num-host-blocks 1000` starts, and the executor reports the pool it was given; it used to
    size its own (a quarter of the device blocks) and the scheduler stopped start-up."""
    proc, base, log_path = start_serve(["random:tiny", "--device", "cpu", "--num-blocks", "64",
                                        "--num-host-blocks", "1000", "--preemption-mode", "swap"], tmp_path)
    try:
        wait_healthy(base, proc, log_path)
        r = httpx.post(f"{base}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text
        ready = _executor_ready(tmp_path)
        assert (ready.num_host_blocks, ready.num_blocks) == (1000, 64)
    finally:
        _stop(proc)


def _compose_commands(env: dict[str, str]) -> dict[str, list[str]]:
    """compose.yaml's commands with ``${VAR:-default}`` substituted from ``env`` (else the default),
    the compose hostnames mapped to 127.0.0.1 and every port to a free local one."""
    with open(os.path.join(ROOT, "compose.yaml")) as f:
        text = re.sub(r"\$\{([A-Z_]+):-([^}]*)\}", lambda m: env.get(m.group(1), m.group(2)), f.read())
    services = yaml.safe_load(text)["services"]
    ports: dict[str, str] = {}

    def local(port: str) -> str:
        return ports.setdefault(port, str(free_port()))

    commands = {}
    for name, svc in services.items():
        cmd, out = svc["command"], []
        for i, arg in enumerate(cmd):
            arg = re.sub(r"tcp://(?:0\.0\.0\.0|executor|scheduler|gateway):(\d+)",
                         lambda m: f"tcp://127.0.0.1:{local(m.group(1))}", arg)
            if i and cmd[i - 1] == "--port":
                arg = local(arg)
            if i and cmd[i - 1] == "--host" and arg == "0.0.0.0":
                arg = "127.0.0.1"
            out.append(arg)
        commands[name] = out
    commands["published"] = [local(services["gateway"]["ports"][0].rsplit(":", 1)[1])]
    return commands


def test_compose_commands_serve_a_completion_over_tcp(tmp_path):
    commands = _compose_commands({"PAGEDSERVE_MODEL": "random:tiny", "PAGEDSERVE_NUM_BLOCKS": "64"})
    base = f"http://127.0.0.1:{commands.pop('published')[0]}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    procs, log_path = [], tmp_path / "compose.log"
    with open(log_path, "w") as log:
        for name in ("executor", "scheduler", "gateway"):    # compose's start order
            procs.append(subprocess.Popen([sys.executable, "-m", "services.cli", *commands[name]],
                                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        wait_healthy(base, procs[-1], log_path, timeout_s=180)
        r = httpx.post(f"{base}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        assert all(p.poll() is None for p in procs), log_path.read_text()[-2000:]
    finally:
        stop_all(dict(zip(("executor", "scheduler", "gateway"), procs)))
