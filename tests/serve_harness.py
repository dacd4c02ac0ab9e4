"""`pagedserve serve` as a real process for the end-to-end tests (test_serve_e2e, test_launcher,
test_soak): start it on a free loopback port with its output in a log file, wait for /health, and
find its three service processes. Stopping it stays with each test: how it stops is what they test.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVICES = ("executor", "scheduler", "gateway")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(args: list[str], tmp_path: Path) -> tuple[subprocess.Popen, str, Path]:
    """``pagedserve serve ARGS --port P`` with its ipc sockets under ``tmp_path`` (so a test can check
    they are removed); returns the process, its base URL and the log file of its stdout + stderr."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TMPDIR=str(tmp_path), PYTHONUNBUFFERED="1")
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", *args, "--port", str(port)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}", log_path


def wait_healthy(base: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = 240) -> None:
    """Poll /health until it answers 200; fails with the log's tail if serve exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"serve did not become healthy in {timeout_s}s:\n{log_path.read_text()[-3000:]}")


@contextlib.contextmanager
def serving(args: list[str], tmp_path: Path) -> Iterator[str]:
    """``pagedserve serve ARGS`` until the block ends (then SIGTERM); yields its base URL once
    healthy. For the end-to-end modules that share one server (a module-scoped fixture)."""
    proc, base, log_path = start_serve(args, tmp_path)
    try:
        wait_healthy(base, proc, log_path)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def stream_completion(base: str, body: dict, events: list, started: threading.Event, after: int = 1) -> None:
    """POST a streamed /v1/completions; ``events`` gets the status code, then each SSE data line.
    ``started`` is set once ``after`` data lines came (or the stream ended). For a thread."""
    with httpx.stream("POST", f"{base}/v1/completions", json=dict(body, stream=True), timeout=180) as resp:
        events.append(resp.status_code)
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) > after:
                    started.set()
    started.set()


def stop_serve(proc: subprocess.Popen) -> None:
    """SIGTERM; serve must exit 0 within a minute (killed if not)."""
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def services_of(launcher) -> dict:
    """{service name: psutil.Process} of the launcher's live children (``launcher`` a psutil.Process)."""
    import psutil                       # the tests that need it importorskip it

    found = {}
    for child in launcher.children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        for name in SERVICES:
            if f"services.{name}" in cmd:
                found[name] = child
    return found
