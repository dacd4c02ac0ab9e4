"""Security basics: loopback binds by default, the API key on every route but /health (compared in
constant time), private ipc:// directories, no pickle on the wire, no user text in INFO logs.

The log test here reads the gateway's records in process (caplog; uvicorn's own loggers do not
propagate to it). tests/test_serve_oracle.py checks what all three processes of `pagedserve serve`
write (stdout and stderr: every logger, uvicorn's access log and any traceback)."""
from __future__ import annotations

import ast
import logging
import os
import stat
from pathlib import Path

import httpx
import pytest

from services.cli import build_parser
from shared.config import config_from_args
from services.gateway import middleware as gateway_middleware
from shared import transport
from tests.gateway_harness import fake, serve_gateway  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-secret-key"

pytestmark = pytest.mark.timeout(60)


def _parse(argv: list[str]):
    parser, _ = build_parser(argv)
    return parser.parse_args(argv)


def test_every_service_binds_loopback_by_default():
    assert _parse(["gateway", "--scheduler-addr", "ipc:///x"]).host == "127.0.0.1"
    assert _parse(["serve"]).host == "127.0.0.1"
    sched = _parse(["scheduler"])
    assert sched.gateway_addr.startswith("tcp://127.0.0.1:")
    assert sched.executor_addr.startswith("tcp://127.0.0.1:")
    assert _parse(["executor"]).addr == ""          # = ipc:// in a private directory (below)


def test_ipc_sockets_live_in_a_private_directory():
    from services import launcher

    assert launcher.runtime_dir is transport.runtime_dir
    d = transport.runtime_dir()
    try:
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        config = config_from_args(_parse(["serve"]), "serve")
        for cmd in launcher.service_commands(config, d).values():
            addrs = [a for a in cmd if a.startswith(("ipc://", "tcp://"))]
            assert addrs and all(a.startswith(f"ipc://{d}/") for a in addrs), cmd
    finally:
        os.rmdir(d)


PROTECTED = [("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/openapi.json"),
             ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/nope"),
             ("DELETE", "/health/../metrics")]


def test_api_key_on_every_route_but_health(fake, monkeypatch):
    compared = []
    real = gateway_middleware.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(gateway_middleware.hmac, "compare_digest", spy)
    body = {"prompt": "x", "max_tokens": 2}
    with serve_gateway(fake, "m", api_key=API_KEY) as srv, httpx.Client(base_url=srv.url, timeout=20) as c:
        for method, path in PROTECTED:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                            {"Authorization": f"Basic {API_KEY}"}):
                r = c.request(method, path, headers=headers, json=body if method == "POST" else None)
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key"
            r = c.request(method, path, headers={"Authorization": f"Bearer {API_KEY}"},
                          json=body if method == "POST" else None)
            assert r.status_code != 401, (method, path)
        assert c.get("/health").status_code == 200
        assert c.get("/metrics", headers={"Authorization": f"bearer {API_KEY}"}).status_code == 200
    assert (b"wrong", API_KEY.encode()) in compared and (API_KEY.encode(), API_KEY.encode()) in compared


def _python_files():
    for top in ("services", "shared"):
        yield from (ROOT / top).rglob("*.py")


def test_no_pickle_on_the_wire():
    """No module imports a pickle-family serializer, and nothing uses pyzmq's pickling helpers."""
    banned_modules = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve"}
    banned_calls = {"send_pyobj", "recv_pyobj", "send_serialized", "recv_serialized"}
    files = list(_python_files())
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            elif isinstance(node, ast.Attribute):
                assert node.attr not in banned_calls, f"{path}:{node.lineno} uses {node.attr}"
                continue
            else:
                continue
            assert not names & banned_modules, f"{path}:{node.lineno} imports {names & banned_modules}"


def test_no_user_text_in_info_logs(fake, caplog):
    """Prompts, stop strings, model names and bad bodies never reach INFO+ log lines."""
    marker = "ZQXJ-secret-user-text"
    fake.reset()
    with serve_gateway(fake, "m", log_level="info") as srv, httpx.Client(base_url=srv.url, timeout=20) as c:
        caplog.set_level(logging.INFO)
        chat = {"messages": [{"role": "user", "content": marker}], "stop": [marker], "user": marker}
        assert c.post("/v1/chat/completions", json=chat).status_code == 200
        assert c.post("/v1/chat/completions", json={**chat, "stream": True}).status_code == 200
        assert c.post("/v1/completions", json={"prompt": marker, "max_tokens": 3}).status_code == 200
        assert c.post("/v1/completions", json={"prompt": marker, "model": marker}).status_code == 404
        assert c.post("/v1/completions", json={"prompt": marker, "n": marker}).status_code == 400
        assert c.post("/v1/completions", content=marker.encode()).status_code == 400
        assert c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": marker}],
            "chat_template_kwargs": {"chat_template": marker}}).status_code == 400
    assert fake.requests, "the requests reached the scheduler"
    leaked = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and marker in r.getMessage()]
    assert not leaked


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_serve_hands_the_api_key_to_the_gateway_off_every_command_line(tmp_path):
    """`serve --api-key`: the gateway enforces it, and no process's command line shows it."""
    psutil = pytest.importorskip("psutil")
    from tests.serve_harness import start_serve, stop_serve, wait_healthy

    proc, base, log_path = start_serve(["random:tiny", "--device", "cpu", "--num-blocks", "64",
                                        "--api-key", API_KEY], tmp_path)
    try:
        wait_healthy(base, proc, log_path)
        assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401
        ok = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
        assert ok.status_code == 200
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3
        assert not [c for c in children if any(API_KEY in a for a in c.cmdline())]
    finally:
        stop_serve(proc)
