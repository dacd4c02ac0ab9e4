"""`pagedserve serve`: start executor, scheduler and gateway as processes on ipc:// sockets.

The three services are the same programs compose runs (`pagedserve executor|scheduler|gateway`);
this launcher picks private socket paths, hands each child every option of shared/config.py its
service uses (argv generated from the one config: ``service_commands``), starts them in
dependency order, waits until the gateway reports healthy, and supervises them: an executor or
scheduler that exits is restarted (exponential backoff, at most ``--max-restarts`` times each;
the scheduler recomputes in-flight requests on a new executor, the gateway fails those of a dead
scheduler with 503); a gateway that exits stops everything with exit code 1. Ctrl-C / SIGTERM
drains: the gateway refuses new requests and lets in-flight ones finish (``--drain-timeout``),
then scheduler and executor stop, the socket directory is removed and the launcher exits 0.

``--data-parallel-size N``: N engines, each a scheduler with its own executor (``scheduler-i``,
``executor-i``), and the one gateway in front of the N schedulers (it routes, see
services/gateway/routing.py). Each engine is supervised on its own; on a CPU each executor gets
its share of the cores (``--num-threads``) so the engines do not oversubscribe them.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from typing import Callable, Optional

from shared.config import Config, ConfigError, add_options, config_from_args, env_of, to_argv
from shared.transport import ipc_address, runtime_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, "serve")


def service_of(name: str) -> str:
    """'executor-1' -> 'executor' (the program a child runs)."""
    return name.partition("-")[0]


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_share(processes: int) -> int:
    """CPU threads for each of ``processes`` executor processes sharing this machine's cores."""
    return max(1, cpu_cores() // processes)


def service_commands(config: Config, sock_dir: str) -> dict[str, list[str]]:
    """The command lines, keyed by child name, in start order: each child's argv is generated
    from ``config`` for its service, with the socket addresses serve picks. One engine:
    executor, scheduler, gateway; N engines: executor-i and scheduler-i for each, then the gateway."""
    n = config.process.data_parallel_size
    suffixes = [""] if n == 1 else [f"-{i}" for i in range(n)]
    ranks = n * config.engine.tensor_parallel_size        # executor processes in all
    threads = config.process.num_threads or (cpu_share(ranks) if n > 1 else 0)
    commands, scheduler_addrs = {}, []
    for suffix in suffixes:
        executor_addr = ipc_address(sock_dir, f"executor{suffix}")
        scheduler_addr = ipc_address(sock_dir, f"scheduler{suffix}")
        scheduler_addrs.append(scheduler_addr)
        engine = replace(config, process=replace(config.process, addr=executor_addr, executor_addr=executor_addr,
                                                 gateway_addr=scheduler_addr, shutdown_executor=True,
                                                 num_threads=threads))
        for name in ("executor", "scheduler"):
            commands[name + suffix] = [sys.executable, "-m", f"services.{name}", *to_argv(engine, name)]
    front = replace(config, gateway=replace(config.gateway, scheduler_addr=scheduler_addrs))
    commands["gateway"] = [sys.executable, "-m", "services.gateway",
                           *to_argv(front, "gateway", secrets_in_env=True)]
    return commands


def service_env(config: Config) -> dict[str, str]:
    """What the children get in their environment besides ours: the secrets (the API key), which
    ``service_commands`` keeps off their command lines (``ps`` shows those to every user)."""
    return env_of(config, "gateway")


def _die_with_parent() -> None:
    """In the child, before exec (Linux): get SIGTERM when the launcher dies, even by SIGKILL,
    so a killed launcher leaves no orphan services behind."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_healthy(url: str, procs: dict[str, subprocess.Popen], timeout: float,
                 supervise: Optional[Callable[[], Optional[str]]] = None) -> None:
    """Poll /health until 200, showing progress; raise if a service exits by itself (a bad flag,
    a model that cannot load) or time runs out. One killed by a signal goes to ``supervise``."""
    from tqdm import tqdm

    deadline = time.monotonic() + timeout
    with tqdm(desc="loading model and starting services", bar_format="{desc} {elapsed}", file=sys.stderr,
              disable=None) as bar:   # None: no bar when stderr is not a terminal
        while time.monotonic() < deadline:
            for name, proc in procs.items():
                code = proc.poll()
                if code is not None and (code >= 0 or supervise is None):
                    raise RuntimeError(f"{name} exited with code {code} during start-up")
            reason = supervise() if supervise is not None else None
            if reason is not None:
                raise RuntimeError(reason)
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            bar.update()
            time.sleep(0.5)
    raise TimeoutError(f"services not healthy after {timeout:.0f}s")


def stop_all(procs: dict[str, subprocess.Popen], grace: float = 10.0, drain_timeout: float = 0.0) -> None:
    """SIGTERM in order gateway (which drains first), schedulers, executors; SIGKILL past grace."""
    order = {"gateway": 0, "scheduler": 1, "executor": 2}
    for name in sorted(procs, key=lambda name: order.get(service_of(name), 3)):
        proc = procs[name]
        if proc.poll() is not None:
            continue
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace + (drain_timeout if name == "gateway" else 0.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Supervisor:
    """Restart policy for the services: the executor and the scheduler come back after a crash,
    each at most ``max_restarts`` times, after ``backoff`` seconds doubling up to ``max_backoff``;
    the gateway is the front door, so its exit ends the whole server."""

    RESTARTABLE = ("executor", "scheduler")

    def __init__(self, commands: dict[str, list[str]], max_restarts: int = 5, backoff: float = 0.5,
                 max_backoff: float = 10.0, log=print, env: Optional[dict[str, str]] = None):
        self.commands, self.max_restarts = commands, max_restarts
        self.env = None if env is None else {**os.environ, **env}
        self.backoff, self.max_backoff, self.log = backoff, max_backoff, log
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts = {name: 0 for name in commands if service_of(name) in self.RESTARTABLE}
        self._due: dict[str, float] = {}              # name -> monotonic time of its restart

    def start(self, name: str) -> None:
        self.procs[name] = subprocess.Popen(self.commands[name], start_new_session=True, env=self.env,
                                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def start_all(self) -> None:
        for name in self.commands:
            self.start(name)

    def check(self) -> Optional[str]:
        """One supervision turn; returns why the server must stop, or None."""
        now = time.monotonic()
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is None or name in self._due:
                continue
            if service_of(name) not in self.RESTARTABLE:
                return f"{name} exited with code {code}"
            if self.restarts[name] >= self.max_restarts:
                return f"{name} exited with code {code} after {self.max_restarts} restarts"
            delay = min(self.backoff * 2 ** self.restarts[name], self.max_backoff)
            self.restarts[name] += 1
            self._due[name] = now + delay
            self.log(f"{name} exited with code {code}; restart {self.restarts[name]}/{self.max_restarts} "
                     f"in {delay:.1f}s")
        for name, due in list(self._due.items()):
            if now >= due:
                del self._due[name]
                self.start(name)
                self.log(f"{name} restarted (pid {self.procs[name].pid})")
        return None


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args, "serve")
    except ConfigError as e:
        print(f"pagedserve serve: error: {e}", file=sys.stderr)
        return 2
    gw, sock_dir = config.gateway, runtime_dir()
    supervisor = Supervisor(service_commands(config, sock_dir), config.process.max_restarts,
                            log=lambda line: print(f"pagedserve serve: {line}", file=sys.stderr, flush=True),
                            env=service_env(config))

    def on_signal(signum, frame):  # SIGTERM behaves like Ctrl-C: leave the wait loop and drain
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        supervisor.start_all()
        host = "127.0.0.1" if gw.host in ("0.0.0.0", "::") else gw.host
        wait_healthy(f"http://{host}:{gw.port}/health", supervisor.procs, config.process.ready_timeout, supervisor.check)
        print(f"pagedserve ready on http://{gw.host}:{gw.port}/v1 (Ctrl-C to stop)", file=sys.stderr)
        while True:
            reason = supervisor.check()
            if reason is not None:
                print(f"pagedserve serve: {reason}; shutting down", file=sys.stderr)
                return 1
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("draining and shutting down", file=sys.stderr)
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"pagedserve serve: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)     # a second SIGTERM must not cut the drain short
        stop_all(supervisor.procs, drain_timeout=gw.drain_timeout)
        shutil.rmtree(sock_dir, ignore_errors=True)
