"""Bad numbers on memserve's command lines and in its deployment settings are refused up front,
with the reason; before, each one crashed deep inside (a division by zero, an instance that exited
during startup), ran a server that refused every request, or crashed after the whole run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from memserve import (
    Engine,
    EngineConfig,
    LlamaModel,
    ModelConfigError,
    Tokenizer,
    engine_demo,
    evaluate,
    instance,
    launch,
    preset,
)
from memserve import __main__ as demo
from memserve.instance import InstanceConfig
from memserve.launch import Cluster, instance_command, instance_devices
from memserve.replay import replay_chats
from memserve.scheduler import Scheduler
from memserve.stages import STAGES

CASES: list[tuple[Callable[[list[str]], int], list[str], str]] = [
    (demo.main, ["--conversations", "0"], "--conversations: must be an int >= 1, got 0"),
    (demo.main, ["--turns", "-1"], "--turns: must be an int >= 1, got -1"),
    (demo.main, ["--reply-tokens", "x"], "--reply-tokens: not an int: 'x'"),
    (demo.main, ["--rate", "0"], "--rate: must be a positive number, got 0.0"),  # ZeroDivisionError before
    (demo.main, ["--rate", "nan"], "--rate: must be a positive number, got nan"),
    (demo.main, ["--model", "huge"], "--model: unknown model preset 'huge'"),  # an instance exited at startup
    (demo.main, ["--out", "/proc/no/such/dir"], "--out: cannot make /proc/no/such/dir"),  # after every stage ran
    (engine_demo.main, ["--concurrency", "0"], "--concurrency: must be an int >= 1, got 0"),
    (evaluate.main, ["all", "--rate", "-1"], "--rate: must be a positive number, got -1.0"),
    (evaluate.main, ["all", "--link-rate", "0"], "--link-rate: must be a positive finite number, got 0.0"),
    (launch.main, ["--prefill", "-1"], "--prefill: must be an int >= 0, got -1"),
    (launch.main, ["--port", "70000"], "--port: must be an int in [0, 65535], got 70000"),
    (launch.main, ["--heartbeat", "0"], "--heartbeat: must be a positive finite number, got 0.0"),
    (launch.main, ["--control-timeout", "inf"], "--control-timeout: must be a positive finite number, got inf"),
    (launch.main, ["--stall-timeout", "-1"], "--stall-timeout: must be a positive finite number, got -1.0"),
    (launch.main, ["--device", "tpu"], "--device: must be 'cpu', 'cuda' or 'cuda:k', got 'tpu'"),
    (launch.main, ["--device", "cuda:99"], "--device: is 'cuda:99' but this machine has"),  # no 100 GPUs here
    (engine_demo.main, ["--device", "cpu:1"], "--device: must be 'cpu', 'cuda' or 'cuda:k', got 'cpu:1'"),
    (instance.main, ["--name", "x", "--max-waiting", "0"], "--max-waiting: must be an int >= 1, got 0"),
    (instance.main, ["--name", "x", "--threads", "-1"], "--threads: must be an int >= 0, got -1"),
    (instance.main, ["--name", "x", "--port", "-1"], "--port: must be an int in [0, 65535], got -1"),
    (instance.main, ["--name", "x", "--transfer-deadline", "nan"], "--transfer-deadline: must be a positive finite"),
    (instance.main, ["--name", "x", "--device", "gpu"], "--device: must be 'cpu', 'cuda' or 'cuda:k', got 'gpu'"),
]


@pytest.mark.parametrize(("main", "argv", "message"), CASES, ids=[f"{m.__module__}{' '.join(a)}" for m, a, _ in CASES])
def test_bad_command_line_numbers_are_usage_errors(
    main: Callable[[list[str]], int], argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = [] if "--out" in argv or main not in (demo.main, evaluate.main) else ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exc:
        main(argv + out)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_instances_are_spread_over_the_gpus_where_the_device_says_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cuda``: instance i on GPU i modulo the GPUs there are; ``cuda:k``: all on k; and each
    instance's command line says its own."""
    assert instance_devices("cpu", 3) == ["cpu"] * 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert instance_devices("cuda", 5) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert instance_devices("cuda:1", 2) == ["cuda:1", "cuda:1"]
    with pytest.raises(ValueError, match="has 2 CUDA GPUs"):
        instance_devices("cuda:2", 1)
    cmd = instance_command("decode-1", "decode", device="cuda:1")
    assert cmd[cmd.index("--device") + 1] == "cuda:1"
    assert Cluster("pd-caching-2", prefill=2, decode=1, device="cuda").devices == ["cuda:0", "cuda:1", "cuda:0"]


def test_the_results_folder_is_made_when_the_command_line_is_read(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):  # the stage is refused after --out was read
        demo.main(["--out", str(tmp_path / "a" / "b"), "--stages", "nope"])
    assert (tmp_path / "a" / "b").is_dir()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"prefill": -1}, ValueError, "prefill must be an int >= 0"),
        ({"colocated": 1.5}, ValueError, "colocated must be an int >= 0"),
        ({"model": "huge"}, ModelConfigError, "unknown model preset"),
        ({"policy": "random"}, ValueError, "policy must be one of"),
        ({"backend": "nccl"}, ValueError, "backend must be"),
        ({"port": 65536}, ValueError, "port must be an int in"),
        ({"device_blocks": 0}, ValueError, "device_blocks must be an int >= 1"),
        ({"host_blocks": -1}, ValueError, "host_blocks must be an int >= 0"),
        ({"threads": -2}, ValueError, "threads must be an int >= 0"),
        ({"max_inflight": 0}, ValueError, "max_inflight must be an int >= 1"),  # every request a 429
        ({"max_waiting": 0}, ValueError, "max_waiting must be an int >= 1"),  # every request a 503
        ({"heartbeat_s": 0.0}, ValueError, "heartbeat_s must be a positive finite number"),
        ({"stall_timeout_s": float("nan")}, ValueError, "stall_timeout_s"),
        ({"control_timeout_s": float("inf")}, ValueError, "control_timeout_s"),  # OverflowError in the scheduler
        ({"startup_timeout": -1}, ValueError, "startup_timeout"),
        ({"warm_up_tokens": -1}, ValueError, "warm_up_tokens must be an int >= 0"),
        ({"device": "mps"}, ValueError, "device must be 'cpu', 'cuda' or 'cuda:k'"),
        ({"device": "cuda:64"}, ValueError, "device is 'cuda:64' but this machine has"),
    ],
)
def test_bad_cluster_settings_are_refused_before_any_process_starts(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Cluster("pd-caching-2", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": 70000}, "port must be an int in"),
        ({"threads": -1}, "threads must be an int >= 0"),
        ({"max_waiting": 0}, "max_waiting must be an int >= 1"),
        ({"transfer_deadline_s": 0}, "transfer_deadline_s must be a positive"),
        ({"device": "cuda:64"}, "device is 'cuda:64' but this machine has"),
    ],
)
def test_bad_instance_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InstanceConfig(name="x", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stall_timeout_s": 0}, "stall_timeout_s must be a positive"),
        ({"control_timeout_s": float("inf")}, "control_timeout_s must be a positive finite"),
        ({"ttl": -1.0}, "ttl must be a positive"),
        ({"bandwidth": 0.0}, "bandwidth must be a positive"),
        ({"attempts": 0}, "attempts must be an int >= 1"),
        ({"block_size": 0}, "block_size must be an int >= 1"),
    ],
)
def test_bad_scheduler_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Scheduler(STAGES["pd-caching-2"], **kwargs)


@pytest.mark.parametrize("name", ["concurrency", "max_turns", "max_reply_tokens", "max_context"])
def test_a_replay_with_a_count_below_one_is_refused(make_engine: Callable[..., Engine], name: str) -> None:
    """``concurrency=0`` admitted no session and stepped an idle engine for good."""
    from memserve.sharegpt import load_conversations

    engine = make_engine()
    with pytest.raises(ValueError, match=f"{name} must be an int >= 1, got 0"):
        replay_chats(engine, Tokenizer("llama3"), load_conversations(1), **{name: 0})
    assert not engine.has_work()


@pytest.mark.parametrize("rate", [0.0, -1.0, float("nan")])
def test_a_replay_at_a_rate_that_is_no_positive_number_is_refused(rate: float, tmp_path: Path) -> None:
    """A negative rate gave sessions negative arrival delays, 0 a ZeroDivisionError."""
    import asyncio

    from memserve.bench import replay_http

    with pytest.raises(ValueError, match="rate must be a positive number"):
        asyncio.run(replay_http("http://127.0.0.1:9", [], rate=rate))
    with pytest.raises(ValueError, match="rate must be a positive number"):
        evaluate.compare("x", [evaluate.Mode("a", "colocated")], [], model="tiny", rate=rate, out=tmp_path)


def test_a_replay_whose_pool_is_held_elsewhere_raises_instead_of_waiting() -> None:
    """Another engine on the pool (or a caller) holding its blocks: the replay waited for good."""
    from mempool.errors import OutOfBlocksError
    from memserve.sharegpt import load_conversations

    model = LlamaModel(preset("tiny-llama3")).init_random()
    engine = Engine(model, EngineConfig(device_blocks=256, host_blocks=0, warm_up_tokens=0))
    held = engine.pool.alloc(255)  # no turn can start
    with pytest.raises(OutOfBlocksError, match="in use elsewhere"):
        replay_chats(engine, Tokenizer("llama3"), load_conversations(2), max_reply_tokens=4, concurrency=2)
    assert not engine.has_work()
    engine.pool.free(held)
    engine.close()
