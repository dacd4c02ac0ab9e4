"""The command line and the compose file agree: every command compose and the launcher run exists,
its flags parse, and the addresses and ports line up. (No Docker engine here: this is what can be
checked without one.)"""
import argparse
import os
import re
import subprocess
import sys

import pytest
import yaml

from services import launcher
from services.cli import SUBCOMMANDS, build_parser
from shared.config import config_from_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(argv: list[str]) -> argparse.Namespace:
    parser, module = build_parser(argv)
    assert module is not None, f"unknown subcommand in {argv}"
    return parser.parse_args(argv)


def compose(name: str) -> dict:
    """The compose file with `${VAR:-default}` taken at its default, as compose does with VAR unset."""
    with open(os.path.join(ROOT, name)) as f:
        text = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", f.read())
    return yaml.safe_load(text)


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "services.cli", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    for name in SUBCOMMANDS:
        assert name in out


def test_unknown_flag_is_a_clear_error():
    proc = subprocess.run([sys.executable, "-m", "services.cli", "scheduler", "--no-such-flag"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "--no-such-flag" in proc.stderr


@pytest.mark.parametrize("file", ["compose.yaml"])
def test_compose_commands_parse_and_addresses_agree(file):
    services = compose(file)["services"]
    args = {name: parse(svc["command"]) for name, svc in services.items()}
    for name, svc in services.items():
        assert svc["command"][0] == name
    # gateway -> scheduler ROUTER, scheduler -> executor ROUTER, over the compose network
    sched_port = args["scheduler"].gateway_addr.rsplit(":", 1)[1]
    assert args["gateway"].scheduler_addr == [f"tcp://scheduler:{sched_port}"]
    exec_port = args["executor"].addr.rsplit(":", 1)[1]
    assert args["scheduler"].executor_addr == f"tcp://executor:{exec_port}"
    assert args["scheduler"].block_size == args["executor"].block_size
    # the published port is the gateway's
    published = services["gateway"]["ports"][0].rsplit(":", 1)[1]
    assert int(published) == args["gateway"].port
    # start order follows health
    assert services["scheduler"]["depends_on"]["executor"]["condition"] == "service_healthy"
    assert services["gateway"]["depends_on"]["scheduler"]["condition"] == "service_healthy"


def test_gpu_override_reserves_a_gpu_for_the_executor():
    gpu = compose("compose.gpu.yaml")["services"]["executor"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert parse(gpu["command"]).device == "cuda"


def test_tensor_parallel_override_makes_two_ranks_of_one_group():
    base, tp = compose("compose.yaml")["services"], compose("compose.tp.yaml")["services"]
    rank0, rank1 = parse(tp["executor"]["command"]), parse(tp["executor-rank1"]["command"])
    assert (rank0.rank, rank1.rank) == (0, 1)
    assert rank0.tensor_parallel_size == rank1.tensor_parallel_size == 2
    assert rank0.dist_init == rank1.dist_init and rank0.dist_init.startswith("tcp://executor:")
    for field in ("model", "device", "block_size", "num_blocks"):        # the same engine on both ranks
        assert getattr(rank0, field) == getattr(rank1, field), field
    # rank 0 is still the executor the scheduler connects to
    assert rank0.addr == parse(base["executor"]["command"]).addr
    assert tp["executor-rank1"]["depends_on"]["executor"]["condition"] == "service_started"


def test_launcher_commands_parse(tmp_path):
    ns = parse(["serve", "--port", "8123", "--num-blocks", "64"])
    for name, cmd in launcher.service_commands(config_from_args(ns, "serve"), str(tmp_path)).items():
        assert cmd[:3] == [sys.executable, "-m", f"services.{name}"]
        sub = parse([name] + cmd[3:])
        if name == "gateway":
            assert sub.port == 8123
        if name == "executor":
            assert sub.num_blocks == 64
