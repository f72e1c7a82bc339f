"""A stranger for the swarm tests, run inside a namespace: ``python netns_stranger.py TARGET HOST KEY SECONDS OUT``.

A peer on no allowlist that forges records and requests (see :func:`stranger`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def _publish(out: str, result: dict) -> None:
    """Write ``result`` to ``out`` atomically: the test kills this process whenever the swarm is done, and a
    kill between ``write_text``'s truncate and its write left an empty file (seen once in CI)."""
    import json
    import os

    tmp = f"{out}.tmp"
    Path(tmp).write_text(json.dumps(result))
    os.replace(tmp, out)


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
            _publish(out, result)
            await asyncio.sleep(1.0)
        await dht.shutdown()
        await p2p.shutdown()
        return result

    _publish(out, asyncio.run(main()))


if __name__ == "__main__":
    stranger(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5])
