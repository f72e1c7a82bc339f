"""Emulated hosts for swarm tests: one Linux network namespace per peer, on bridges, with impaired links.

``Hosts(n)`` makes namespaces ``<pfx>_h<i>`` whose ``eth0`` has a private address ``10.<a>.<b>.<11+i>/24``
that exists only inside them. Hosts ``0 .. n/2-1`` plug into bridge ``br0``, the others into ``br1``; both
bridges live in a switch namespace and are joined by one veth link, so :meth:`Hosts.partition` cuts the
network in two halves and :meth:`Hosts.heal` joins them again. Nothing is added to the root namespace.

Impairments: :meth:`Hosts.rate` puts a token bucket (``tc qdisc tbf``) on a host's egress; this kernel has
no ``netem``, so delay and loss go through a user-space TCP relay (``python netns.py relay``) in front of a
peer that listens on its own loopback and announces the relay's address (``swarm.announce_maddrs``):
every chunk is delayed by ``--delay-ms``, and a "lost" chunk (probability ``--loss``) is delayed by an
extra retransmission timeout (200 ms) instead, as TCP would deliver it; order is kept.

Every process started with :meth:`Hosts.popen` runs in its own session; :meth:`Hosts.down` (also run by
the context manager on failure) kills those sessions, then any process left in the namespaces, and
deletes every namespace. ``python netns.py stranger ...`` is a peer that is on no allowlist and forges
records and requests (see :func:`stranger`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def unavailable() -> str | None:
    """Why namespaces cannot be used here (None: they can)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs these tests as root)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    probe = f"dlprobe{secrets.token_hex(3)}"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None if ok else "`ip netns add` is not permitted here"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Hosts:
    """``n`` emulated hosts on two joined bridges (see the module docstring)."""

    def __init__(self, n: int, halves: int | None = None) -> None:
        self.n = n
        self.pfx = f"dl{secrets.token_hex(2)}"  # unique: tests running side by side never share a namespace
        self.net = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
        self.half = n // 2 if halves is None else halves
        self.sw = f"{self.pfx}_sw"
        self.procs: list[subprocess.Popen] = []

    def ns(self, i: int) -> str:
        return f"{self.pfx}_h{i}"

    def ip(self, i: int) -> str:
        return f"{self.net}.{11 + i}"

    def up(self) -> Hosts:
        _ip("netns", "add", self.sw)
        _ip("-n", self.sw, "link", "set", "lo", "up")
        for br in ("br0", "br1"):
            _ip("-n", self.sw, "link", "add", br, "type", "bridge")
            _ip("-n", self.sw, "link", "set", br, "up")
        _ip("-n", self.sw, "link", "add", "lk0", "type", "veth", "peer", "name", "lk1")
        for k in (0, 1):
            _ip("-n", self.sw, "link", "set", f"lk{k}", "master", f"br{k}")
            _ip("-n", self.sw, "link", "set", f"lk{k}", "up")
        for i in range(self.n):
            _ip("netns", "add", self.ns(i))
            _ip("link", "add", "eth0", "netns", self.ns(i), "type", "veth", "peer", "name", f"sw{i}", "netns", self.sw)
            _ip("-n", self.sw, "link", "set", f"sw{i}", "master", "br0" if i < self.half else "br1")
            _ip("-n", self.sw, "link", "set", f"sw{i}", "up")
            _ip("-n", self.ns(i), "link", "set", "lo", "up")
            _ip("-n", self.ns(i), "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            _ip("-n", self.ns(i), "link", "set", "eth0", "up")
        return self

    def __enter__(self) -> Hosts:
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- processes ---------------------------------------------------------------------------------------
    def popen(self, i: int, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``argv`` inside host ``i`` (its own session), output to ``log``."""
        with open(log, "ab") as f:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(i), *argv],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=os.environ | (env or {}),
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def relay(self, i: int, listen_port: int, target_port: int, delay_ms: float, loss: float, log: Path):
        """A delaying, "losing" TCP relay on host ``i``: ``<ip(i)>:listen_port`` -> ``127.0.0.1:target_port``."""
        argv = [sys.executable, str(HERE), "relay", f"{self.ip(i)}:{listen_port}", f"127.0.0.1:{target_port}"]
        return self.popen(i, [*argv, str(delay_ms), str(loss)], log)

    # -- links ---------------------------------------------------------------------------------------------
    def partition(self) -> None:
        """Cut hosts ``< half`` from the others (both halves keep their own links)."""
        _ip("-n", self.sw, "link", "set", "lk0", "down")

    def heal(self) -> None:
        _ip("-n", self.sw, "link", "set", "lk0", "up")

    def rate(self, i: int, rate: str) -> None:
        """A token-bucket bandwidth limit on host ``i``'s egress, e.g. ``"10mbit"``."""
        subprocess.run(
            ["ip", "netns", "exec", self.ns(i), "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate]
            + ["burst", "64kb", "latency", "400ms"],
            check=True,
            capture_output=True,
        )

    # -- clean-up ----------------------------------------------------------------------------------------
    def down(self) -> None:
        """Kill every process this made (by session), any left in its namespaces, and delete them."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        names = [self.ns(i) for i in range(self.n)] + [self.sw]
        for name in names:  # anything still running in a namespace (a p2p daemon) is killed by its PID
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for name in names:
            for _ in range(20):
                if subprocess.run(["ip", "netns", "del", name], capture_output=True).returncode == 0:
                    break
                if name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout:
                    break
                time.sleep(0.1)

    def leftovers(self) -> list[str]:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return [line.split()[0] for line in listed.splitlines() if line.startswith(self.pfx)]


# -- helpers run inside a namespace: python netns.py relay|stranger ... ------------------------------------
def relay(listen: str, target: str, delay_ms: float, loss: float) -> None:
    """Forward TCP ``listen`` -> ``target``, delaying each chunk (and "losing" some: see the module docstring)."""
    import asyncio
    import random

    delay, rto = delay_ms / 1000, 0.2
    rng = random.Random(0)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        async def pump() -> None:
            last = 0.0
            while True:
                due, data = await queue.get()
                if data is None:
                    break
                due = max(due, last)  # order kept: a retransmitted chunk holds back the ones behind it
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                last = due
                writer.write(data)
                await writer.drain()
            writer.close()

        task = asyncio.create_task(pump())
        try:
            while data := await reader.read(16384):
                queue.put_nowait((loop.time() + delay + (rto if rng.random() < loss else 0.0), data))
        except ConnectionError:
            pass
        queue.put_nowait((0.0, None))
        await asyncio.gather(task, return_exceptions=True)

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        host, port = target.rsplit(":", 1)
        try:
            tr, tw = await asyncio.open_connection(host, int(port))
        except OSError:
            cw.close()
            return
        await asyncio.gather(pipe(cr, tw), pipe(tr, cw), return_exceptions=True)

    async def main() -> None:
        host, port = listen.rsplit(":", 1)
        server = await asyncio.start_server(handle, host, int(port))
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def stranger(target: str, host: str, key: str, seconds: float, out: str) -> None:
    """A peer on no allowlist that, for ``seconds``: stores records naming every peer it meets (round 1,000,000,
    far-future expiry, old and owner-key subkeys, its own signature), and sends each a 100 MB request and a
    request for round 200,000. Writes what it was told to ``out`` (JSON)."""
    import asyncio
    import json

    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.node import DHTNode
    from hivemind.p2p import P2P
    from hivemind.utils import get_dht_time

    from declora.comm.swarm_protocol import HANDLER
    from declora.comm.swarm_wire import read_frame

    async def flood(p2p: P2P, peer, client: int, size: int, round_: int) -> str:
        head = {"v": 1, "sender": client, "round": round_, "kind": "exchange", "to": 0, "run": ""}
        raw = json.dumps(head).encode()
        try:
            _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(peer, HANDLER), 10)
            writer.write(len(raw).to_bytes(4, "big") + raw + size.to_bytes(8, "big"))
            block = bytes(1 << 20)
            for _ in range(size >> 20):
                writer.write(block)
                await asyncio.wait_for(writer.drain(), 5)
            answer = (await asyncio.wait_for(read_frame(reader, 0), 5))[0]
            writer.close()
            return str(answer)[:200]
        except Exception as err:  # noqa: BLE001 - refused and closed: what the swarm should do
            return f"{type(err).__name__}"

    async def main() -> dict:
        for _ in range(90):  # the swarm may not be up yet
            try:
                p2p = await P2P.create(initial_peers=[target], host_maddrs=[f"/ip4/{host}/tcp/0"])
                break
            except Exception:  # noqa: BLE001
                await asyncio.sleep(1.0)
        signer = RSASignatureValidator()
        dht = await DHTNode.create(p2p=p2p, initial_peers=[target], record_validator=signer)
        me = p2p.peer_id.to_base58()
        result: dict = {"peer": me, "stores": 0, "accepted": 0, "answers": []}
        end, flooded = time.monotonic() + seconds, set()
        while time.monotonic() < end:
            for info in await p2p.list_peers():
                pid = info.peer_id.to_base58()
                for client in range(4):
                    value = {"client": client, "peer": pid, "round": 10**6, "maddrs": [], "fp": "", "keys": {}}
                    for sub, v in [(f"{client}/{pid}", value), (signer.local_public_key, value | {"peer": me})]:
                        ok = await dht.store(key, v | {"t": time.time()}, get_dht_time() + 10**6, subkey=sub)
                        result["stores"] += 1
                        result["accepted"] += int(bool(ok))
                if pid not in flooded:
                    flooded.add(pid)
                    result["answers"].append([pid, await flood(p2p, info.peer_id, 1, 100 << 20, 1)])
                    result["answers"].append([pid, await flood(p2p, info.peer_id, 1, 0, 200_000)])
            Path(out).write_text(json.dumps(result))
            await asyncio.sleep(1.0)
        await dht.shutdown()
        await p2p.shutdown()
        return result

    Path(out).write_text(json.dumps(asyncio.run(main())))


if __name__ == "__main__":
    if sys.argv[1] == "relay":
        relay(sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]))
    elif sys.argv[1] == "stranger":
        stranger(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]), sys.argv[6])
