"""A MemPool in its own process, driven by JSON commands on stdin, answering on stdout.

Started by tests/transport/conftest.py: ``python peer_proc.py '<json config>'``. Prints one
``{"ready": ...}`` line with its control address, then answers each command line with one line.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import threading
import time
import traceback
from typing import Any

import numpy as np
import torch

from mempool import Blocks, MemPool, PoolConfig
from mempool.config import TransportConfig


async def ucx_rogue(host: str, port: int, ident: str) -> dict[str, Any]:
    """Connect to a UCX data listener, present ``ident`` as the connection id, then wait for a
    message: ``closed`` when the listener ends the endpoint (what it must do with an id no
    handshake issued), ``waited`` when nothing happens for 5 s."""
    import ucxx

    ep = await ucxx.create_endpoint(host, port, endpoint_error_handling=True)
    try:
        await ep.send(np.frombuffer(ident.encode("ascii"), dtype=np.uint8), tag=0)
        await asyncio.wait_for(ep.recv(np.zeros(8, dtype=np.uint8), tag=1), 5.0)
        return {"outcome": "received"}
    except asyncio.TimeoutError:
        return {"outcome": "waited"}
    except Exception as exc:  # the listener aborted the endpoint
        return {"outcome": "closed", "why": type(exc).__name__}
    finally:
        ep.abort()


def digest(pool: MemPool, blocks: Blocks) -> str:
    data = pool.storage(blocks.tier).gather(blocks.ids).cpu().contiguous()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()


def block_digests(pool: MemPool, blocks: Blocks) -> list[str]:
    """One digest per block, in order."""
    return [digest(pool, blocks[i : i + 1]) for i in range(len(blocks))]


def token_kv(tokens: list[int], block_size: int, block_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Stand-in K/V for ``tokens``: block i is a function of ``tokens[: (i + 1) * block_size]``
    alone, as a model's K/V is of the tokens up to it, so two sequences with a common prefix
    have the same bytes in its whole blocks."""
    out = []
    for i in range(-(-len(tokens) // block_size)):
        seed = int.from_bytes(hashlib.sha256(repr(tokens[: (i + 1) * block_size]).encode()).digest()[:8], "little")
        g = torch.Generator().manual_seed(seed)
        out.append(torch.rand(block_shape, generator=g) + 0.5)
    return torch.stack(out).to(dtype)


class Peer:
    def __init__(self, cfg: dict[str, Any]) -> None:
        layout = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "block_size": 4, "dtype": "float16"}
        layout.update(cfg.get("layout", {}))
        self.pool = MemPool(
            PoolConfig(
                **layout,
                device_blocks=cfg.get("device_blocks", 256),
                host_blocks=cfg.get("host_blocks", 0),
                device=cfg.get("device", "cpu"),
            )
        )
        tcfg = {
            k: cfg[k]
            for k in (
                "name",
                "secret",
                "backend",
                "deadline_s",
                "receipt_ttl_s",
                "chunk_bytes",
                "heartbeat_s",
                "ucx_shared_memory",
                "same_host_pull",
            )
            if k in cfg
        }
        self.address = self.pool.serve(TransportConfig(**tcfg))
        self.handles: dict[str, Blocks] = {}
        self.jobs: dict[str, threading.Thread] = {}
        self.results: dict[str, Any] = {}

    def alloc(self, n: int, layout: str = "run") -> Blocks | None:
        """``n`` device blocks: one run, or every other block of one (``scattered``); None if no room."""
        if layout != "scattered":
            return self.pool.alloc(n)
        run = self.pool.alloc(2 * n)
        if run is None:
            return None
        self.pool.free(run[1::2])
        return run[::2]

    def alloc_fill(self, name: str, n: int, layout: str = "run", seed: int = 0) -> dict[str, Any]:
        blocks = self.alloc(n, layout)
        assert blocks is not None
        if n == 0:
            self.handles[name] = blocks
            return {"ids": [], "digest": None}
        storage = self.pool.storage()
        g = torch.Generator().manual_seed(seed)
        data = (torch.rand((n, *storage.layout.block_shape), generator=g) + 0.5).to(storage.tensor.dtype)
        storage.scatter(blocks.ids, data)
        self.handles[name] = blocks
        return {"ids": blocks.tolist(), "digest": digest(self.pool, blocks)}

    def handle(self, cmd: dict[str, Any]) -> Any:
        op = cmd.pop("op")
        pool = self.pool
        if op == "connect":
            pool.connect(cmd["name"], cmd["host"], cmd["port"])
            return {"peers": pool.peers()}
        if op == "alloc_fill":
            return self.alloc_fill(**cmd)
        if op == "alloc_tokens":  # blocks holding token_kv(tokens); None when the device tier is full
            tokens, storage = cmd["tokens"], pool.storage()
            blocks = self.alloc(-(-len(tokens) // pool.config.block_size), cmd.get("layout", "run"))
            if blocks is None:
                return {"ids": None}
            storage.scatter(
                blocks.ids, token_kv(tokens, pool.config.block_size, storage.layout.block_shape, storage.tensor.dtype)
            )
            self.handles[cmd["name"]] = blocks
            return {"ids": blocks.tolist(), "digest": digest(pool, blocks), "blocks": block_digests(pool, blocks)}
        if op == "cached":  # what the index holds of tokens: its whole blocks (both tiers), then the tail
            tokens, ns, bs = cmd["tokens"], cmd.get("ns"), pool.config.block_size
            with pool.match(tokens, ns) as m:
                blocks = block_digests(pool, m.blocks) + block_digests(pool, m.host_blocks)
            tail: dict[str, Any] = {"tokens": 0, "digest": None}
            if len(blocks) == len(tokens) // bs:
                # a full tier would make room by dropping tails first (perhaps this one)
                own = pool.alloc(1) if pool.stats()["device"]["free"] else None
                if own is None:
                    tail = {"tokens": None, "digest": None}  # no free block to copy it into: unknown
                else:
                    try:
                        n = pool.copy_tail(tokens, len(blocks) * bs, own, ns)
                        tail = {"tokens": n, "digest": digest(pool, own) if n else None}
                    finally:
                        pool.free(own)
            return {"blocks": blocks, "tail": tail}
        if op == "send":
            return self._result(pool.transfer(cmd["peer"], self.handles[cmd["handle"]], key=cmd["key"]))
        if op == "send_insert":
            blocks = self.handles[cmd["handle"]]
            return self._result(pool.transfer_with_insert(cmd["peer"], cmd["tokens"], blocks, cmd.get("ns")))
        if op == "send_async":
            job = cmd.pop("job")

            def run() -> None:
                try:
                    self.results[job] = self.handle(dict(cmd, op=cmd.pop("then")))
                except Exception as exc:
                    self.results[job] = {"error": type(exc).__name__, "message": str(exc)}

            self.jobs[job] = threading.Thread(target=run)
            self.jobs[job].start()
            return {"started": job}
        if op == "wait":
            self.jobs[cmd["job"]].join(cmd.get("timeout", 60))
            return self.results.get(cmd["job"], {"error": "Timeout", "message": "job still running"})
        if op == "insert_own":
            blocks = self.handles[cmd["handle"]]
            return {"inserted": pool.insert(cmd["tokens"], blocks, cmd.get("ns"))}
        if op == "claim":
            blocks = pool.claim(cmd["key"])
            if blocks is None:
                return {"claimed": None}
            out = {"claimed": len(blocks), "digest": digest(pool, blocks)}
            pool.free(blocks)
            return out
        if op == "match":
            with pool.match(cmd["tokens"], cmd.get("ns")) as m:
                return {"num_tokens": m.num_tokens, "digest": digest(pool, m.blocks) if len(m.blocks) else None}
        if op == "match_tail":  # digest of the matched blocks after the first skip_blocks
            with pool.match(cmd["tokens"], cmd.get("ns")) as m:
                return {"digest": digest(pool, m.blocks[cmd["skip_blocks"] :])}
        if op == "copy_tail":  # the tail kept after tokens[:start], copied into a block of our own
            own = pool.alloc(1)
            assert own is not None
            try:
                n = pool.copy_tail(cmd["tokens"], cmd["start"], own, cmd.get("ns"))
                return {"tokens": n, "digest": digest(pool, own) if n else None}
            finally:
                pool.free(own)
        if op == "digest_rows":
            return {"digest": digest(pool, self.handles[cmd["handle"]][cmd["start"] : cmd["stop"]])}
        if op == "digest":
            return {"digest": digest(pool, self.handles[cmd["handle"]])}
        if op == "free":
            return {"released": pool.free(self.handles.pop(cmd["handle"]))}
        if op == "set_delay":
            assert pool._agent is not None
            pool._agent.segment_delay_s = float(cmd["seconds"])
            return {}
        if op == "set_pull_delay":
            assert pool._agent is not None
            pool._agent.pull_delay_s = float(cmd["seconds"])
            return {}
        if op == "state":
            pool.check_invariants()
            s = pool.stats()
            return {
                "device_used": s["device"]["used"],
                "device_cached": s["device"]["cached"],
                "host_used": s["host"]["used"] if "host" in s else 0,
                "transport": pool.transport_stats(),
                "peers": pool.peers(),
                "refusals": pool._agent.refusals if pool._agent else [],
                "data": pool._agent._data_info if pool._agent else None,  # where its data listener is
            }
        if op == "ucx_rogue":  # dial a peer's UCX data listener with no handshake behind it
            agent = pool._agent
            assert agent is not None
            return agent._call(ucx_rogue(cmd["host"], cmd["port"], cmd["ident"]), 60)
        if op in ("raw_send", "raw_recv"):  # the backend alone: one message of nbytes per rep
            agent = pool._agent
            assert agent is not None
            link = agent._peers[cmd["peer"]].link
            buf = torch.ones(cmd["nbytes"] // 8, dtype=torch.int64, device=pool.storage().device)

            async def timed(coro: Any) -> float:  # on the agent's loop, as a transfer's own seconds are
                t0 = time.perf_counter()
                await coro
                return time.perf_counter() - t0

            times = []
            for i in range(cmd["reps"]):
                time.sleep(cmd.get("gap_s", 0.0))  # idle first (both peers), untimed
                coro = link.send(buf, 0x7000 + i) if op == "raw_send" else link.recv(buf, 0x7000 + i)
                times.append(agent._call(timed(coro), 120))
            return {"seconds": times}
        if op in ("raw_pieces_send", "raw_pieces_recv"):  # count messages of nbytes, all in flight at once
            agent = pool._agent
            assert agent is not None
            link = agent._peers[cmd["peer"]].link
            count = cmd["count"]
            pieces = torch.ones(count * cmd["nbytes"] // 8, dtype=torch.int64, device=pool.storage().device).view(
                count, -1
            )
            move = link.send if op == "raw_pieces_send" else link.recv

            async def everything() -> None:
                await asyncio.gather(*(move(pieces[i], 0x100000 + i) for i in range(count)))

            t0 = time.perf_counter()
            agent._call(everything(), 300)
            return {"seconds": time.perf_counter() - t0}
        if op == "bench_send":  # repeated transfers of one handle, timed here
            out = []
            for i in range(cmd["reps"]):
                time.sleep(cmd.get("gap_s", 0.0))  # idle first (both peers), untimed
                t0 = time.perf_counter()
                res = pool.transfer(cmd["peer"], self.handles[cmd["handle"]], key=f"{cmd['key']}-{i}")
                wall = time.perf_counter() - t0  # the caller's view: with the hops to the agent's loop and back
                assert res is not None
                out.append(
                    {
                        "wall": wall,
                        "seconds": res.seconds,
                        "data_seconds": res.data_seconds,
                        "messages": res.messages,
                        "bytes": res.bytes,
                        "pulled": res.pulled,
                    }
                )
            return {"runs": out}
        if op == "claim_all":
            n = 0
            for i in range(cmd["reps"]):
                blocks = pool.claim(f"{cmd['key']}-{i}")
                if blocks is not None:
                    n += len(blocks)
                    pool.free(blocks)
            return {"claimed": n}
        if op == "close":  # the pool stays usable afterwards; say what close left held
            start = time.monotonic()
            pool.close()
            return {"seconds": time.monotonic() - start, "device_used": pool.stats()["device"]["used"]}
        if op == "exit":
            pool.close()
            return {"bye": True}
        raise ValueError(f"unknown op {op!r}")

    @staticmethod
    def _result(res: Any) -> dict[str, Any]:
        if res is None:
            return {"result": None}
        return {
            "result": {
                "sent": res.sent_blocks,
                "skipped": res.skipped_blocks,
                "bytes": res.bytes,
                "messages": res.messages,
                "seconds": res.seconds,
                "pulled": res.pulled,
            }
        }


def main() -> None:
    cfg = json.loads(sys.argv[1])
    peer = Peer(cfg)
    out = sys.stdout
    out.write(json.dumps({"ready": True, "host": peer.address[0], "port": peer.address[1]}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = peer.handle(json.loads(line))
        except Exception as exc:
            reply = {"error": type(exc).__name__, "message": str(exc), "trace": traceback.format_exc()[-2000:]}
        out.write(json.dumps(reply) + "\n")
        out.flush()
        if reply.get("bye"):
            break


if __name__ == "__main__":
    np.seterr(all="raise")
    main()
