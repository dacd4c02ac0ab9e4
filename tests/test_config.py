"""One definition of every option (shared/config.py): each command's flags come from it, serve
hands every child the options its service uses, and the executor's handshake is merged into the
scheduler's config by one rule."""
from __future__ import annotations

import pytest

from services import launcher
from services.cli import build_parser
from shared.config import (
    SERVICES, CacheConfig, Config, ConfigError, SchedulerConfig, all_flags, config_from_args, options_of,
    resolve_with_executor, to_argv,
)
from shared.messages import ExecutorReady

# values that must be valid where the generic rule below would not give one
_VALID = {"model": "random:tiny", "device": "cpu", "host": "127.0.0.2", "api_key": "sk-test",
          "served_model_name": "served", "block_size": 8, "port": 8123, "data_parallel_size": 2}


def _other(flag):
    """A valid value for ``flag`` different from its default."""
    d = flag.default
    if flag.name in _VALID:
        return _VALID[flag.name]
    if isinstance(d, bool):
        return not d
    if flag.option.choices:
        return next(c for c in flag.option.choices if c != d)
    if isinstance(d, int):
        return d + 3
    if isinstance(d, float):
        return d / 2
    if isinstance(d, list):
        return ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]
    return f"{flag.name}-value" if not flag.option.type else "tcp://127.0.0.1:9"


def _get(config, path):
    for p in path:
        config = getattr(config, p)
    return config


def _set(config, path, value):
    *parents, name = path
    setattr(_get(config, parents), name, value)


def _parse(command: str, argv: list[str]) -> Config:
    parser, _ = build_parser([command, *argv])
    return config_from_args(parser.parse_args([command, *argv]), command)


def _everything_changed() -> Config:
    config = Config()
    for f in all_flags():
        _set(config, f.path, _other(f))
        assert _get(config, f.path) != f.default, f.name
    return config


def test_every_serve_option_arrives_with_its_value_in_each_process_that_uses_it(tmp_path, monkeypatch):
    want = _everything_changed()
    # serve's own command line carries every one of its options ...
    served = _parse("serve", to_argv(want, "serve"))
    for f in options_of("serve"):
        assert _get(served, f.path) == _get(want, f.path), f.flag
    # ... and each child, parsed by its own parser, gets every option its service uses
    commands = launcher.service_commands(served, str(tmp_path))      # two engines (data_parallel_size 2)
    for name, value in launcher.service_env(served).items():        # the API key: in the environment
        monkeypatch.setenv(name, value)
    assert list(commands) == ["executor-0", "scheduler-0", "executor-1", "scheduler-1", "gateway"]
    children = {name: _parse(launcher.service_of(name), cmd[3:]) for name, cmd in commands.items()}
    for name, child in children.items():
        taken = [f for f in options_of(launcher.service_of(name)) if not f.option.by_serve]
        assert taken, name
        for f in taken:
            assert _get(child, f.path) == _get(want, f.path), f"{name} {f.flag}"
    # the options serve sets itself: the addresses line up, and each scheduler owns its executor
    gw = children["gateway"].gateway
    engines = [(children[f"executor-{i}"].process, children[f"scheduler-{i}"].process) for i in range(2)]
    for ex, sched in engines:
        assert sched.executor_addr == ex.addr and sched.shutdown_executor
    assert gw.scheduler_addr == [sched.gateway_addr for _, sched in engines]
    assert len({ex.addr for ex, _ in engines} | set(gw.scheduler_addr)) == 4
    # the limits of the issue reach the executor, not only the scheduler
    for f in ("max_num_batched_tokens", "num_host_blocks", "max_model_len", "block_size", "num_blocks"):
        assert f"--{f.replace('_', '-')}" in commands["executor-0"]


def test_one_engine_keeps_the_three_service_names_and_n_engines_share_the_cores(tmp_path, monkeypatch):
    one = launcher.service_commands(Config(), str(tmp_path))
    assert list(one) == list(SERVICES)
    assert _parse("executor", one["executor"][3:]).process.num_threads == 0      # torch's default
    monkeypatch.setattr(launcher, "cpu_cores", lambda: 8)
    config = Config()
    config.process.data_parallel_size = 3
    three = launcher.service_commands(config, str(tmp_path))
    assert [_parse("executor", three[f"executor-{i}"][3:]).process.num_threads for i in range(3)] == [2, 2, 2]
    assert len(_parse("gateway", three["gateway"][3:]).gateway.scheduler_addr) == 3


def test_the_api_key_reaches_the_gateway_in_its_environment_not_on_a_command_line(tmp_path):
    config = Config()
    config.gateway.api_key = "sk-secret-value"
    commands = launcher.service_commands(config, str(tmp_path))
    assert not [cmd for cmd in commands.values() if any("sk-secret-value" in a for a in cmd)]
    assert not [cmd for cmd in commands.values() if "--api-key" in cmd]
    assert launcher.service_env(config) == {"PAGEDSERVE_API_KEY": "sk-secret-value"}


def test_world_size_is_another_spelling_of_tensor_parallel_size():
    argv = ["--world-size", "2", "--rank", "1", "--dist-init", "tcp://10.0.0.1:29500"]
    config = _parse("executor", argv)
    assert config.engine.tensor_parallel_size == 2 and config.process.rank == 1
    assert config.process.dist_init == "tcp://10.0.0.1:29500"
    assert "--tensor-parallel-size" in to_argv(config, "executor")


def test_every_option_serve_does_not_set_is_a_serve_flag():
    serve = {f.path for f in options_of("serve")}
    for name in SERVICES:
        for f in options_of(name):
            assert f.option.by_serve or f.path in serve, f"{name} {f.flag} is not a serve option"


@pytest.mark.parametrize("command", ["executor", "scheduler", "gateway", "generate", "serve"])
def test_every_command_has_the_one_default(command, monkeypatch):
    monkeypatch.delenv("PAGEDSERVE_API_KEY", raising=False)
    extra = {"gateway": ["--scheduler-addr", "ipc:///x"], "generate": ["--prompt", "x"]}.get(command, [])
    parser, _ = build_parser([command])
    args = parser.parse_args([command, *extra])
    for f in options_of(command):
        if not f.option.repeat:
            assert getattr(args, f.name) == f.default, f"{command} {f.flag}"


_BAD = {"--block-size": "3", "--max-num-seqs": "0", "--num-host-blocks": "-1", "--max-model-len": "x",
        "--watermark": "1.5", "--port": "70000", "--dtype": "float8"}


@pytest.mark.parametrize("command, flag, value", [
    (command, f.flag, _BAD[f.flag]) for command in ("executor", "scheduler", "gateway", "generate", "serve")
    for f in options_of(command) if f.flag in _BAD])
def test_bad_values_are_argparse_errors_naming_the_flag(command, flag, value, capsys):
    extra = {"gateway": ["--scheduler-addr", "ipc:///x"], "generate": ["--prompt", "x"]}.get(command, [])
    parser, _ = build_parser([command])
    with pytest.raises(SystemExit) as e:
        parser.parse_args([command, *extra, flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_values_wrong_together_are_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match="max_num_batched_tokens must be >= max_model_len"):
        _parse("scheduler", ["--no-enable-chunked-prefill", "--max-model-len", "4096",
                             "--max-num-batched-tokens", "2048"])


# ------------------------------------------------------------------------------ the handshake merge


def _ready(**kw) -> ExecutorReady:
    fields = dict(model="m", block_size=16, num_blocks=300, num_host_blocks=75, max_model_len=2048,
                  vocab_size=512, eos_token_ids=[0], max_num_batched_tokens=2048, max_num_seqs=256)
    return ExecutorReady(**(fields | kw))


def test_zero_takes_the_executors_value():
    sched, cache = resolve_with_executor(SchedulerConfig(max_model_len=0, max_num_batched_tokens=0),
                                         CacheConfig(), _ready())
    assert (cache.num_blocks, cache.num_host_blocks) == (300, 75)
    assert (sched.max_model_len, sched.max_num_batched_tokens, sched.max_num_seqs) == (2048, 2048, 256)


def test_a_smaller_value_is_the_schedulers_own_limit():
    sched, cache = resolve_with_executor(SchedulerConfig(max_model_len=512, max_num_batched_tokens=1024,
                                                         max_num_seqs=8),
                                         CacheConfig(num_blocks=100, num_host_blocks=10), _ready())
    assert (cache.num_blocks, cache.num_host_blocks) == (100, 10)
    assert (sched.max_model_len, sched.max_num_batched_tokens, sched.max_num_seqs) == (512, 1024, 8)


@pytest.mark.parametrize("sched, cache, message", [
    (dict(max_num_batched_tokens=4096), {}, "--max-num-batched-tokens 4096 but the executor enforces 2048"),
    (dict(max_model_len=4096), {}, "--max-model-len 4096 but the executor enforces 2048"),
    (dict(max_num_seqs=512), {}, "--max-num-seqs 512 but the executor enforces 256"),
    ({}, dict(num_blocks=301), "--num-blocks 301 but the executor enforces 300"),
    ({}, dict(num_host_blocks=1000), "--num-host-blocks 1000 but the executor enforces 75"),
    ({}, dict(block_size=8), "--block-size 8 but the executor uses 16"),
])
def test_a_value_the_executor_cannot_honour_is_an_error_naming_both(sched, cache, message):
    with pytest.raises(ConfigError, match=message):
        resolve_with_executor(SchedulerConfig(**sched), CacheConfig(**cache), _ready())


def test_a_cap_the_executor_does_not_enforce_is_the_schedulers():
    sched, _ = resolve_with_executor(SchedulerConfig(max_num_batched_tokens=4096, max_num_seqs=512),
                                     CacheConfig(), _ready(max_num_batched_tokens=0, max_num_seqs=0))
    assert (sched.max_num_batched_tokens, sched.max_num_seqs) == (4096, 512)
    with pytest.raises(ConfigError, match="no limit to take"):
        resolve_with_executor(SchedulerConfig(max_num_batched_tokens=0), CacheConfig(),
                              _ready(max_num_batched_tokens=0))


def test_the_sliding_window_is_the_models_always_the_executors():
    _, cache = resolve_with_executor(SchedulerConfig(), CacheConfig(), _ready(sliding_window=4096))
    assert cache.sliding_window == 4096
    _, cache = resolve_with_executor(SchedulerConfig(), CacheConfig(sliding_window=64), _ready())
    assert cache.sliding_window == 0                  # a model with a global layer frees nothing
    assert _ready().sliding_window == 0               # an executor that does not report one
    assert not [f for f in all_flags() if "window" in f.name]     # not a flag: it comes from the model
    with pytest.raises(ConfigError, match="sliding_window"):
        CacheConfig(sliding_window=-1).validate()
