"""Emulated hosts for swarm tests: one Linux network namespace per peer, on bridges, with impaired links.

``Hosts(n)`` makes namespaces ``<pfx>_h<i>`` whose ``eth0`` has a private address ``10.<a>.<b>.<11+i>/24``
that exists only inside them. Hosts ``0 .. n/2-1`` plug into bridge ``br0``, the others into ``br1``; both
bridges live in a switch namespace and are joined by one veth link, so :meth:`Hosts.partition` cuts the
network in two halves and :meth:`Hosts.heal` joins them again. Nothing is added to the root namespace.

NAT: a host in ``Hosts(n, nat={i})`` sits behind a home router, namespace ``<pfx>_r<i>``, which holds
``ip(i)`` on the bridge and masquerades (``iptables -t nat ... MASQUERADE``) the host's private network
``192.168.<100+i>.0/24``; the host itself has ``addr(i)`` = ``192.168.<100+i>.2`` and a default route via
the router. It can dial out; nobody can dial in (no route to its address, nothing forwarded to it);
:meth:`Hosts.egress_only` also limits where it may dial out to (a firewall on the router).

Impairments: :meth:`Hosts.rate` puts a token bucket (``tc qdisc tbf``) on a host's egress; this kernel has
no ``netem``, so delay and loss go through a user-space TCP relay (``python netns.py relay``) in front of a
peer that listens on its own loopback and announces the relay's address (``swarm.announce_maddrs``):
every chunk is delayed by ``--delay-ms``, and a "lost" chunk (probability ``--loss``) is delayed by an
extra retransmission timeout (200 ms) instead, as TCP would deliver it; order is kept.

Every process started with :meth:`Hosts.popen` runs in its own session; :meth:`Hosts.down` (also run by
the context manager on failure) kills those sessions, then any process left in the namespaces, and
deletes every namespace. ``python netns_stranger.py ...`` is a peer that is on no allowlist and forges
records and requests.
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


def nat_unavailable() -> str | None:
    """Why a NAT router cannot be emulated here (None: ``iptables -t nat`` MASQUERADE works in a namespace)."""
    if shutil.which("iptables") is None:
        return "iptables is not installed (Debian: apt-get install iptables)"
    probe = f"dlnat{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
        rule = ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "lo", "-j", "MASQUERADE"]
        done = subprocess.run(["ip", "netns", "exec", probe, *rule], capture_output=True, text=True)
        return None if done.returncode == 0 else f"`iptables -t nat` fails: {done.stderr.strip()[:200]}"
    except subprocess.CalledProcessError as err:
        return f"`ip netns add` fails: {err.stderr!r}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Hosts:
    """``n`` emulated hosts on two joined bridges (see the module docstring)."""

    def __init__(self, n: int, halves: int | None = None, nat: set[int] | frozenset[int] = frozenset()) -> None:
        self.n, self.nat = n, frozenset(nat)
        self.pfx = f"dl{secrets.token_hex(2)}"  # unique: tests running side by side never share a namespace
        self.net = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
        self.half = n // 2 if halves is None else halves
        self.sw = f"{self.pfx}_sw"
        self.procs: list[subprocess.Popen] = []

    def ns(self, i: int) -> str:
        return f"{self.pfx}_h{i}"

    def ip(self, i: int) -> str:
        """Host ``i``'s address on the bridge (its router's, for a host behind NAT)."""
        return f"{self.net}.{11 + i}"

    def addr(self, i: int) -> str:
        """The address host ``i`` itself has: ``ip(i)``, or its private one behind NAT."""
        return f"192.168.{100 + i}.2" if i in self.nat else self.ip(i)

    def _namespaces(self) -> list[str]:
        return [self.ns(i) for i in range(self.n)] + [f"{self.pfx}_r{i}" for i in sorted(self.nat)] + [self.sw]

    def _plug(self, i: int) -> str:
        """Make host ``i``'s namespace and its way onto the bridge; returns the namespace holding ``ip(i)``."""
        _ip("netns", "add", self.ns(i))
        _ip("-n", self.ns(i), "link", "set", "lo", "up")
        if i not in self.nat:
            return self.ns(i)
        router, lan = f"{self.pfx}_r{i}", f"192.168.{100 + i}"
        _ip("netns", "add", router)
        _ip("-n", router, "link", "set", "lo", "up")
        _ip("link", "add", "eth0", "netns", self.ns(i), "type", "veth", "peer", "name", "lan", "netns", router)
        _ip("-n", router, "addr", "add", f"{lan}.1/24", "dev", "lan")
        _ip("-n", router, "link", "set", "lan", "up")
        _ip("-n", self.ns(i), "addr", "add", f"{lan}.2/24", "dev", "eth0")
        _ip("-n", self.ns(i), "link", "set", "eth0", "up")
        _ip("-n", self.ns(i), "route", "add", "default", "via", f"{lan}.1")
        nat = ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE"]
        for argv in (["sysctl", "-qw", "net.ipv4.ip_forward=1"], nat):
            subprocess.run(["ip", "netns", "exec", router, *argv], check=True, capture_output=True)
        return router

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
            wan = self._plug(i)
            _ip("link", "add", "eth0", "netns", wan, "type", "veth", "peer", "name", f"sw{i}", "netns", self.sw)
            _ip("-n", self.sw, "link", "set", f"sw{i}", "master", "br0" if i < self.half else "br1")
            _ip("-n", self.sw, "link", "set", f"sw{i}", "up")
            _ip("-n", wan, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            _ip("-n", wan, "link", "set", "eth0", "up")
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
        """A delaying, "losing" TCP relay on host ``i``: ``<addr(i)>:listen_port`` -> ``127.0.0.1:target_port``."""
        argv = [sys.executable, str(HERE), "relay", f"{self.addr(i)}:{listen_port}", f"127.0.0.1:{target_port}"]
        return self.popen(i, [*argv, str(delay_ms), str(loss)], log)

    # -- links ---------------------------------------------------------------------------------------------
    def partition(self) -> None:
        """Cut hosts ``< half`` from the others (both halves keep their own links)."""
        _ip("-n", self.sw, "link", "set", "lk0", "down")

    def heal(self) -> None:
        _ip("-n", self.sw, "link", "set", "lk0", "up")

    def egress_only(self, i: int, j: int) -> None:
        """Host ``i``'s NAT router lets it open connections to host ``j`` only (replies still come back)."""
        router = f"{self.pfx}_r{i}"
        for rule in (["-d", self.ip(j), "-j", "ACCEPT"], ["-j", "REJECT"]):
            argv = ["ip", "netns", "exec", router, "iptables", "-A", "FORWARD", "-i", "lan", *rule]
            subprocess.run(argv, check=True, capture_output=True)

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
        names = self._namespaces()
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


# -- run inside a namespace: python netns.py relay ... ------------------------------------------------------
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


if __name__ == "__main__":
    if sys.argv[1] == "relay":
        relay(sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]))
