"""Start a memserve deployment on this machine: the scheduler plus N prefill and M decode instances.

``python -m memserve.launch --stage pd-caching-2 --prefill 1 --decode 1`` serves the OpenAI API
until interrupted. Instances are child processes that exit with the launcher (no orphans); an
instance started by hand elsewhere joins with ``python -m memserve.instance --scheduler URL``.

Across hosts (``docs/multihost.md``): ``--prefill 0 --decode 0 --host ADDR`` runs the scheduler
alone, listening on ``ADDR``; each instance runs on its own host with ``--host`` its own address
and ``--scheduler http://ADDR:PORT``, the same ``MEMSERVE_SECRET`` and ``--stage``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from .api import make_app
from .auth import control_token
from .checks import arg, check_device, check_int, check_port, check_positive, preset_arg
from .config import preset
from .faults import FAULTS_ENV
from .instance import SECRET_ENV
from .scheduler import POLICIES, Scheduler
from .stages import Stage, stage
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+; annotations only, never imported at run time

T = TypeVar("T")


def instance_command(
    name: str,
    role: str = "colocated",
    *,
    model: str = "default",
    caching: bool = True,
    host: str = "127.0.0.1",
    device_blocks: int = 2048,
    host_blocks: int = 2048,
    backend: str = "ucx",
    threads: int = 0,
    max_waiting: int = 256,
    scheduler: str | None = None,
    ucx_shared_memory: bool = True,
    transfer_deadline_s: float = 30.0,
    warm_up_tokens: int | None = None,
    device: str = "cpu",
) -> list[str]:
    """The command line of one instance process that exits with its parent (``scheduler``: register
    there by itself, as an instance started by hand does)."""
    cmd = [sys.executable, "-m", "memserve.instance", "--name", name, "--role", role, "--device", device]
    cmd += ["--caching", "on" if caching else "off", "--model", model, "--host", host]
    cmd += ["--device-blocks", str(device_blocks), "--host-blocks", str(host_blocks), "--backend", backend]
    cmd += ["--threads", str(threads), "--max-waiting", str(max_waiting), "--exit-with-parent"]
    cmd += ["--ucx-shared-memory", "on" if ucx_shared_memory else "off"]
    cmd += ["--transfer-deadline", str(transfer_deadline_s)]
    if warm_up_tokens is not None:  # else the instance's default
        cmd += ["--warm-up-tokens", str(warm_up_tokens)]
    return cmd + (["--scheduler", scheduler] if scheduler else [])


def instance_devices(device: str, n: int) -> list[str]:
    """Where each of ``n`` instances runs: ``"cpu"``; ``"cuda"``, one GPU after another (instance
    i on GPU i modulo the GPUs there are); or ``"cuda:k"``, all on GPU k.

    Raises:
        ValueError: not ``cpu`` or ``cuda[:k]``, or a GPU that this machine does not have.
    """
    check_device("device", device)
    if device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        return [f"cuda:{i % gpus}" for i in range(n)]
    return [device] * n


def roles_for(stage: Stage, prefill: int, decode: int, colocated: int | None) -> list[str]:
    """The instances' roles of a deployment of ``stage`` (colocated stages: ``colocated``, or
    ``prefill + decode``, instances)."""
    if stage.disaggregated:
        return ["prefill"] * prefill + ["decode"] * decode
    return ["colocated"] * (colocated if colocated is not None else prefill + decode)


def read_until(proc: subprocess.Popen[str], timeout: float, pick: Callable[[str], T | None], what: str) -> T:
    """The first ``pick(line)`` that is not None over ``proc``'s output lines.

    Raises:
        RuntimeError: ``proc`` ended first, or gave no such line within ``timeout`` seconds; a
            process that is still running then, printing or silent, is killed.
    """
    assert proc.stdout is not None
    late = threading.Event()

    def expire() -> None:
        late.set()
        proc.kill()  # a silent process would block the read below for good

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        for line in iter(proc.stdout.readline, ""):
            got = pick(line)
            if got is not None:
                break
        else:
            got = None
    finally:
        timer.cancel()
    if late.is_set():
        raise RuntimeError(f"{what} did not start within {timeout:g} s (killed)")
    if got is None:
        raise RuntimeError(f"{what} exited during startup (code {proc.wait()})")
    return got


def ready_info(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The ``READY`` line an instance process prints once it serves (lines before it are skipped)."""
    return read_until(
        proc, timeout, lambda line: json.loads(line[6:]) if line.startswith("READY ") else None, "an instance"
    )


class Managed(ABC):
    """A context manager over ``start()`` and ``close()``: what a failed start made is closed too."""

    @abstractmethod
    def start(self) -> None:
        """Bring everything up."""

    @abstractmethod
    def close(self) -> None:
        """Take down whatever exists, also after a partial start."""

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Cluster(Managed):
    """Instances (processes) + the scheduler's HTTP server (a thread of this process); a context manager."""

    def __init__(
        self,
        stage_name: str = "pd-caching-2",
        *,
        prefill: int = 1,
        decode: int = 1,
        colocated: int | None = None,
        policy: str = "prompt-tree",
        model: str = "default",
        host: str = "127.0.0.1",
        port: int = 0,
        device_blocks: int = 2048,
        host_blocks: int = 2048,
        backend: str = "ucx",
        threads: int | None = None,
        startup_timeout: float = 180.0,
        api_key: str | None = None,
        heartbeat_s: float = 1.0,
        max_inflight: int = 256,
        max_waiting: int = 256,
        stall_timeout_s: float = 15.0,
        control_timeout_s: float = 30.0,
        link_aware: bool = True,
        faults: dict[str, dict[str, Any]] | None = None,
        warm_up_tokens: int | None = None,
        device: str = "cpu",
    ) -> None:
        """``faults``: instance name -> what :mod:`memserve.faults` injects there (tests);
        ``prefill=decode=0`` (or ``colocated=0``): the scheduler alone, instances join it;
        ``warm_up_tokens``: as ``EngineConfig``'s, ``None`` leaves the instances' default;
        ``device``: where the instances' models and device tiers are (:func:`instance_devices`)."""
        self.stage: Stage = stage(stage_name)
        for name, count in (("prefill", prefill), ("decode", decode), ("colocated", colocated)):
            if count is not None:
                check_int(name, count)
        self.roles = roles_for(self.stage, prefill, decode, colocated)
        self.devices = instance_devices(device, len(self.roles))
        preset(model)  # ModelConfigError now, not an instance that exits during startup
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if backend not in ("ucx", "torch"):
            raise ValueError(f"backend must be 'ucx' or 'torch', got {backend!r}")
        check_port("port", port)
        check_int("device_blocks", device_blocks, 1)
        check_int("host_blocks", host_blocks)
        if threads is not None:
            check_int("threads", threads)
        for name, value in (("max_inflight", max_inflight), ("max_waiting", max_waiting)):
            check_int(name, value, 1)  # 0: every request refused
        for name, seconds in (
            ("startup_timeout", startup_timeout),
            ("heartbeat_s", heartbeat_s),
            ("stall_timeout_s", stall_timeout_s),
            ("control_timeout_s", control_timeout_s),
        ):
            check_positive(name, seconds)
        if warm_up_tokens is not None:
            check_int("warm_up_tokens", warm_up_tokens)
        self.policy, self.model, self.host, self.port = policy, model, host, port
        self.device_blocks, self.host_blocks, self.backend = device_blocks, host_blocks, backend
        cores = os.cpu_count() or 1
        self.threads = threads if threads is not None else max(1, cores // max(1, len(self.roles)))
        self.startup_timeout = startup_timeout
        self.api_key = api_key
        self.heartbeat_s = heartbeat_s
        self.max_inflight, self.max_waiting, self.stall_timeout_s = max_inflight, max_waiting, stall_timeout_s
        self.control_timeout_s = control_timeout_s
        self.link_aware = link_aware
        self.faults = faults or {}
        self.warm_up_tokens = warm_up_tokens
        # instances started by hand elsewhere must share it: they read the same variable
        self.secret = os.environ.get(SECRET_ENV) or secrets.token_hex(16)
        self.procs: list[subprocess.Popen[str]] = []
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self.scheduler: Scheduler | None = None

    @property
    def names(self) -> list[str]:
        """The instances' names, in the order of :attr:`procs`."""
        return [f"{role}-{i}" for i, role in enumerate(self.roles)]

    def process(self, name: str) -> subprocess.Popen[str]:
        """The process of instance ``name``."""
        return self.procs[self.names.index(name)]

    def _spawn(self, index: int, role: str) -> subprocess.Popen[str]:
        caching = self.stage.caches(role)
        name = self.names[index]
        cmd = instance_command(
            name,
            role,
            model=self.model,
            caching=caching,
            host=self.host,
            device_blocks=self.device_blocks,
            host_blocks=self.host_blocks,
            backend=self.backend,
            threads=self.threads,
            max_waiting=self.max_waiting,
            warm_up_tokens=self.warm_up_tokens,
            device=self.devices[index],
        )
        env = {**os.environ, SECRET_ENV: self.secret}
        if name in self.faults:
            env[FAULTS_ENV] = json.dumps(self.faults[name])
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)

    def start(self) -> None:
        """Spawn the instances, wait until each is ready, start the scheduler and register them."""
        self.procs = [self._spawn(i, role) for i, role in enumerate(self.roles)]
        infos = [ready_info(p, self.startup_timeout) for p in self.procs]
        ready = threading.Event()
        errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._serve, args=(infos, ready, errors), daemon=True)
        self._thread.start()
        if not ready.wait(self.startup_timeout) or errors:
            raise RuntimeError(f"the scheduler did not start: {errors[:1]}")

    def _serve(self, infos: list[dict[str, Any]], ready: threading.Event, errors: list[BaseException]) -> None:
        async def main() -> None:
            self._stop = asyncio.Event()
            token = control_token(self.secret)
            tokenizer = Tokenizer("llama3")
            self.scheduler = Scheduler(
                self.stage,
                policy=self.policy,
                stall_timeout_s=self.stall_timeout_s,
                control_timeout_s=self.control_timeout_s,
                link_aware=self.link_aware,
                token=token,
                detokenize=tokenizer.decode_bytes,
            )
            for info in infos:
                await self.scheduler.register(info)
            heartbeat = asyncio.ensure_future(self.scheduler.heartbeat(self.heartbeat_s))
            runner = web.AppRunner(
                make_app(
                    self.scheduler,
                    tokenizer,
                    api_key=self.api_key,
                    max_inflight=self.max_inflight,
                    control_token=token,
                )
            )
            await runner.setup()
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            server = getattr(site, "_server", None)
            port = server.sockets[0].getsockname()[1] if server and server.sockets else self.port
            self.url = f"http://{self.host}:{port}"
            ready.set()
            try:
                await self._stop.wait()
            finally:
                heartbeat.cancel()
                await self.scheduler.close()
                await runner.cleanup()

        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(main())
        except BaseException as exc:
            errors.append(exc)
            ready.set()
        finally:
            self._loop.close()

    def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the scheduler, then every instance (SIGTERM, then SIGKILL after 15 s)."""
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=30)
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()


def main(argv: list[str] | None = None) -> int:
    from .stages import STAGES

    ap = argparse.ArgumentParser(prog="python -m memserve.launch", description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=list(STAGES), default="pd-caching-2")
    ap.add_argument("--prefill", type=arg(check_int, 0), default=1, help="0 with --decode 0: instances join later")
    ap.add_argument("--decode", type=arg(check_int, 0), default=1)
    ap.add_argument("--policy", choices=POLICIES, default="prompt-tree")
    ap.add_argument("--model", type=preset_arg, default="default")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=arg(check_port), default=8000)
    ap.add_argument("--backend", choices=("ucx", "torch"), default="ucx")
    ap.add_argument(
        "--device", type=arg(check_device, parse=str), default="cpu", help="cpu; cuda (over all GPUs); or cuda:k"
    )
    seconds = arg(check_positive, parse=float)
    ap.add_argument("--heartbeat", type=seconds, default=1.0, help="seconds between health probes of instances")
    ap.add_argument("--stall-timeout", type=seconds, default=15.0, help="seconds of silence that mean a stall")
    ap.add_argument(
        "--control-timeout", type=seconds, default=30.0, help="seconds an instance has to answer /connect or /push"
    )
    ap.add_argument("--link-aware", choices=("on", "off"), default="on", help="skip handoffs slower than recompute")
    args = ap.parse_args(argv)
    api_key = os.environ.get("MEMSERVE_API_KEY")  # optional: then /v1 needs "Authorization: Bearer <key>"
    with Cluster(
        args.stage,
        prefill=args.prefill,
        decode=args.decode,
        policy=args.policy,
        model=args.model,
        host=args.host,
        port=args.port,
        backend=args.backend,
        device=args.device,
        api_key=api_key,
        heartbeat_s=args.heartbeat,
        stall_timeout_s=args.stall_timeout,
        control_timeout_s=args.control_timeout,
        link_aware=args.link_aware == "on",
    ) as cluster:
        print(
            f"memserve ({args.stage}, {len(cluster.roles)} instances) serving the OpenAI API at {cluster.url}/v1",
            flush=True,
        )
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
