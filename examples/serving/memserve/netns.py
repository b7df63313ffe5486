"""Several hosts on one machine: Linux network namespaces joined by a bridge (tests and demos).

Each host is a network namespace with its own loopback and one veth pair into a bridge of the
root namespace, holding an address of a private /24; the bridge holds ``.254`` of it, so this
process reaches every host. :meth:`Hosts.cut` takes a host's bridge port down (``ip link set
... down``), a network partition; :meth:`Hosts.restore` heals it. Everything made is named after
the process that made it (``msv<pid>-<n>...``) and removed by :meth:`Hosts.close`, processes
first; :func:`sweep` removes what a process that died without closing left behind.

:class:`Deployment` runs memserve on such hosts: the scheduler on one, each instance on its own,
joined as on real machines (addresses, ``--scheduler URL``), KV crossing the veths through the
transport. Needs root and iproute2: :func:`unavailable` says why not, where not.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from .faults import FAULTS_ENV
from .instance import SECRET_ENV
from .launch import Managed, instance_command, read_until, ready_info, roles_for
from .stages import stage as stage_named

_COUNT = itertools.count()
# msv<pid, base 36>-<n, base 36> then: b (the bridge), p<i> / h<i> (veth ends), -<host> (a namespace)
_NAME = re.compile(r"^msv([0-9a-z]{1,5})-[0-9a-z]{1,2}(b|[ph][0-9]{1,3}|-[a-z0-9-]+)$")


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if not n:
            return out


def _ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def unavailable() -> str | None:
    """Why namespaces cannot be made here (``None``: they can)."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    probe = f"msv{_b36(os.getpid())}-0-probe"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if done.returncode:
        return f"'ip netns add' failed: {done.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _owner_alive(name: str) -> bool:
    m = _NAME.match(name)
    if m is None:
        return True  # not ours
    try:
        os.kill(int(m.group(1), 36), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_names() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _link_names() -> list[str]:
    return [e["ifname"] for e in json.loads(_ip("-j", "link", "show") or "[]")]


def _kill_netns(ns: str) -> None:
    for pid in _ip("netns", "pids", ns, check=False).split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _ip("netns", "del", ns, check=False)


def leftovers(tag: str) -> list[str]:
    """The namespaces and links named with ``tag`` (:attr:`Hosts.tag`) that exist."""
    mine = re.compile(re.escape(tag) + r"(b|[ph][0-9]{1,3}|-.+)")
    return [n for n in _netns_names() + _link_names() if mine.fullmatch(n)]


def sweep() -> list[str]:
    """Remove the namespaces and links that processes now dead left; their names."""
    gone = [ns for ns in _netns_names() if not _owner_alive(ns)]
    for ns in gone:
        _kill_netns(ns)
    links = [name for name in _link_names() if not _owner_alive(name)]
    for name in links:
        _ip("link", "del", name, check=False)
    return gone + links


class Hosts(Managed):
    """Named hosts (network namespaces) on one bridge; a context manager that removes them all."""

    def __init__(self, names: list[str]) -> None:
        if len(set(names)) != len(names) or not all(re.fullmatch(r"[a-z0-9-]{1,32}", n) for n in names):
            raise ValueError(f"host names must be distinct, lowercase letters, digits and '-', got {names}")
        if len(names) > 200:
            raise ValueError("at most 200 hosts")
        self.tag = f"msv{_b36(os.getpid())}-{_b36(next(_COUNT) % 1296)}"
        self.names = list(names)
        self.bridge = f"{self.tag}b"
        self._index = {n: i for i, n in enumerate(names)}
        self._procs: list[subprocess.Popen[str]] = []
        self.subnet = self._free_subnet()
        self.gateway = str(self.subnet.network_address + 254)
        self._made: list[str] = []  # namespaces made, for close()

    @staticmethod
    def _free_subnet() -> ipaddress.IPv4Network:
        used = [ipaddress.ip_interface(a).network for a in re.findall(r"inet (\S+)", _ip("-4", "addr", "show"))]
        start = os.getpid() % 5000
        for k in range(5000):
            i = (start + k) % 5000
            net = ipaddress.IPv4Network(f"10.{200 + i // 100}.{i % 100}.0/24")
            if not any(net.overlaps(u) for u in used):
                return net
        raise RuntimeError("no free 10.200-249.x.0/24 subnet")

    def netns(self, name: str) -> str:
        """The namespace of host ``name``."""
        return f"{self.tag}-{name}"

    def port(self, name: str) -> str:
        """The bridge-side end of host ``name``'s veth (in this namespace)."""
        return f"{self.tag}p{self._index[name]}"

    def address(self, name: str) -> str:
        """Host ``name``'s address."""
        return str(self.subnet.network_address + 1 + self._index[name])

    def start(self) -> None:
        """Make the bridge, the namespaces and their links."""
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for name in self.names:
            ns, inner, port = self.netns(name), f"{self.tag}h{self._index[name]}", self.port(name)
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("link", "add", inner, "type", "veth", "peer", "name", port)
            _ip("link", "set", port, "master", self.bridge)
            _ip("link", "set", port, "up")
            _ip("link", "set", inner, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{self.address(name)}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """Start ``argv`` on host ``name`` (stdout piped, text); stopped by :meth:`close`."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns(name), *argv],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        self._procs.append(proc)
        return proc

    def cut(self, name: str) -> None:
        """Partition host ``name`` from every other host (its bridge port goes down)."""
        _ip("link", "set", self.port(name), "down")

    def restore(self, name: str) -> None:
        """Heal :meth:`cut`."""
        _ip("link", "set", self.port(name), "up")

    def link_bytes(self, name: str) -> dict[str, int]:
        """Bytes host ``name`` has ``sent`` and ``received`` over its link (its bridge port's counters)."""
        stats = Path("/sys/class/net") / self.port(name) / "statistics"
        return {
            "sent": int((stats / "rx_bytes").read_text()),  # what the port received came from the host
            "received": int((stats / "tx_bytes").read_text()),
        }

    def leftovers(self) -> list[str]:
        """What of this object's namespaces and links still exists."""
        return leftovers(self.tag)

    def close(self) -> None:
        """Stop every process started here (SIGTERM, SIGKILL after 10 s), then remove the namespaces,
        their links and the bridge."""
        for p in self._procs:
            if p.poll() is None:
                _signal_group(p, signal.SIGTERM)
        for p in self._procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait(timeout=10)
            if p.stdout is not None:
                p.stdout.close()
        for ns in self._made:
            _kill_netns(ns)
        links = _link_names()  # a veth pair goes with either end; its namespace's end goes lazily
        for name in [self.port(n) for n in self.names] + [self.bridge]:
            if name in links:
                _ip("link", "del", name, check=False)


def _signal_group(proc: subprocess.Popen[str], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


class Deployment(Managed):
    """memserve across hosts: the scheduler on host ``scheduler``, each instance on a host of its
    own name, joined by address. A context manager; :attr:`url` is the OpenAI API's base URL."""

    def __init__(
        self,
        stage_name: str = "pd-caching-2",
        *,
        prefill: int = 1,
        decode: int = 1,
        colocated: int | None = None,
        model: str = "tiny-llama3",
        device_blocks: int = 256,
        host_blocks: int = 256,
        heartbeat_s: float = 1.0,
        stall_timeout_s: float = 15.0,
        transfer_deadline_s: float = 30.0,
        link_aware: bool = True,
        faults: dict[str, dict[str, Any]] | None = None,
        startup_timeout: float = 180.0,
    ) -> None:
        self.stage = stage_named(stage_name)
        self.roles = roles_for(self.stage, prefill, decode, colocated)
        self.names = [f"{role}-{i}" for i, role in enumerate(self.roles)]
        self.model, self.device_blocks, self.host_blocks = model, device_blocks, host_blocks
        self.heartbeat_s, self.stall_timeout_s = heartbeat_s, stall_timeout_s
        self.transfer_deadline_s, self.link_aware = transfer_deadline_s, link_aware
        self.faults = faults or {}
        self.startup_timeout = startup_timeout
        self.hosts = Hosts(["scheduler", *self.names])
        self.url = ""
        self.env = {**os.environ, SECRET_ENV: os.environ.get(SECRET_ENV) or os.urandom(16).hex()}
        self._procs: dict[str, subprocess.Popen[str]] = {}

    def start(self) -> None:
        """Make the hosts, start the scheduler, then the instances; return once all joined."""
        self.hosts.start()
        addr = self.hosts.address("scheduler")
        cmd = [sys.executable, "-m", "memserve.launch", "--stage", self.stage.name, "--prefill", "0"]
        cmd += ["--decode", "0", "--host", addr, "--port", "8000", "--heartbeat", str(self.heartbeat_s)]
        cmd += ["--stall-timeout", str(self.stall_timeout_s), "--link-aware", "on" if self.link_aware else "off"]
        sched = self._procs["scheduler"] = self.hosts.spawn("scheduler", cmd, self.env)
        self.url = self._serving_url(sched)
        threads = max(1, (os.cpu_count() or 1) // max(1, len(self.roles)))
        for name, role in zip(self.names, self.roles):
            cmd = instance_command(
                name,
                role,
                model=self.model,
                caching=self.stage.caches(role),
                host=self.hosts.address(name),
                device_blocks=self.device_blocks,
                host_blocks=self.host_blocks,
                threads=threads,
                scheduler=self.url,
                ucx_shared_memory=False,  # the hosts share this kernel's /dev/shm: keep KV on the network
                transfer_deadline_s=self.transfer_deadline_s,
            )
            env = {**self.env, FAULTS_ENV: json.dumps(self.faults[name])} if name in self.faults else self.env
            self._procs[name] = self.hosts.spawn(name, cmd, env)
        for name in self.names:
            ready_info(self._procs[name], self.startup_timeout)
        deadline = time.monotonic() + self.startup_timeout
        while set(self.members()) != set(self.names):
            if time.monotonic() > deadline:
                raise RuntimeError(f"instances did not join the scheduler: {sorted(self.members())}")
            time.sleep(0.2)

    def _serving_url(self, proc: subprocess.Popen[str]) -> str:
        def url(line: str) -> str | None:
            m = re.search(r"serving the OpenAI API at (http://\S+)/v1", line)
            return m.group(1) if m else None

        return read_until(proc, self.startup_timeout, url, "the scheduler")

    def stats(self, check: bool = False) -> dict[str, Any]:
        """The scheduler's ``/admin/stats``."""
        with urllib.request.urlopen(f"{self.url}/admin/stats" + ("?check=1" if check else ""), timeout=60) as r:
            stats: dict[str, Any] = json.loads(r.read())
        return stats

    def members(self) -> dict[str, dict[str, Any]]:
        """The scheduler's view of every instance: role, url, alive, incarnation."""
        members: dict[str, dict[str, Any]] = self.stats()["members"]
        return members

    def process(self, name: str) -> subprocess.Popen[str]:
        """The process of ``name`` (an instance, or ``"scheduler"``)."""
        return self._procs[name]

    def close(self) -> None:
        """Stop every process and remove every namespace and link."""
        self.hosts.close()
