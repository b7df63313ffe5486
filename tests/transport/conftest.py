"""Two-process transport tests: each peer is a real process on 127.0.0.1, driven over pipes."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("peer_proc.py")
SECRET = "test-secret-0123456789abcdef"
HAS_UCX = importlib.util.find_spec("ucxx") is not None
BACKENDS = [
    pytest.param("ucx", marks=[pytest.mark.ucx, pytest.mark.skipif(not HAS_UCX, reason="needs the ucx extra (ucxx)")]),
    "torch",
]
# How KV travels: each backend's data link, or the same-host pull (over the torch backend's
# control plane; a pull moves no byte over the link). Peers take the data link unless a test
# says ``same_host_pull=True``.
PATHS = [*BACKENDS, "pull"]


def path_config(path: str) -> dict[str, Any]:
    """Peer options for one of :data:`PATHS`."""
    return {"backend": "torch", "same_host_pull": True} if path == "pull" else {"backend": path}


class PeerProcess:
    def __init__(self, name: str, **cfg: Any) -> None:
        self.name = name
        conf = {"name": name, "secret": SECRET, "backend": "torch", "deadline_s": 10.0, "same_host_pull": False, **cfg}
        env = dict(
            os.environ,
            # ahead of the caller's path (which may hold the dependencies), not instead of it
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH")])),
            UCX_WARN_UNUSED_ENV_VARS="n",
            PYTHONUNBUFFERED="1",
        )
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), json.dumps(conf)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self._exiting = False
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self._pumps = [threading.Thread(target=f, daemon=True) for f in (self._pump, self._pump_err)]
        for t in self._pumps:
            t.start()
        ready = self._read(60)
        assert ready.get("ready"), ready
        self.host, self.port = ready["host"], ready["port"]

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self._lines.put(line)
        self._lines.put(None)

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    def _read(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"{self.name} did not answer in {timeout} s; stderr:\n{''.join(self._stderr[-30:])}"
            ) from None
        if line is None:
            raise AssertionError(f"{self.name} exited; stderr:\n{''.join(self._stderr[-30:])}")
        return json.loads(line)

    def call(self, op: str, timeout: float = 60, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def ok(self, op: str, timeout: float = 60, **args: Any) -> dict[str, Any]:
        out = self.call(op, timeout, **args)
        assert "error" not in out, out
        return out

    def wait_state(self, done: Callable[[dict[str, Any]], Any], timeout: float = 15) -> dict[str, Any]:
        """Poll ``state`` until ``done(state)`` holds (or ``timeout`` passes); return the last state."""
        deadline = time.monotonic() + timeout
        state = self.ok("state")
        while not done(state) and time.monotonic() < deadline:
            time.sleep(0.1)
            state = self.ok("state")
        return state

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the peer process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def connect_to(self, other: PeerProcess) -> None:
        self.ok("connect", name=other.name, host=other.host, port=other.port)

    def pause(self) -> None:
        """SIGSTOP the peer and return once every one of its threads has stopped: the thread the
        kernel hands the signal to may sit in an uninterruptible wait for a while, and until it
        wakes the others go on running (answering a transfer, say)."""
        self.proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in self._tasks()]
            except OSError:  # a thread ended between the listing and the read
                continue
            if all(s in "tTZX" for s in states):
                return
            time.sleep(0.001)
        raise AssertionError(f"{self.name} did not stop within 10 s")

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def _tasks(self) -> list[Path]:
        return list(Path(f"/proc/{self.proc.pid}/task").iterdir())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def request_exit(self) -> None:
        """Ask the peer to close its pool and exit, without waiting (``stop`` waits)."""
        if self.proc.poll() is None and not self._exiting:
            self._exiting = True
            assert self.proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, OSError):
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.request_exit()
            with contextlib.suppress(AssertionError):
                self._read(15)  # its answer, or its end
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def close_pipes(self) -> None:
        """Once the process has ended: let the readers reach the end of its output, then close
        the pipes (left to the collector, they warn as unclosed files)."""
        for t in self._pumps:
            t.join(5)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., PeerProcess]]:
    started: list[PeerProcess] = []

    def make(name: str, **cfg: Any) -> PeerProcess:
        p = PeerProcess(name, **cfg)
        started.append(p)
        return p

    yield make
    for p in started:  # all at once: each exit takes ~0.6 s, mostly the interpreter's own
        p.request_exit()
    for p in started:
        p.stop()
        p.kill()
        p.close_pipes()
