"""Who may be in the swarm and what it announces: the allowlist, peer IDs, and signed DHT records.

Every peer stores one record under ``<swarm.name>.peers``, subkey ``[owner:<its RSA public key>]``
(the key of its libp2p identity, so the subkey names its peer ID), value
``{client, peer, round, maddrs, fp, keys, t}``, signed with that key
(:class:`hivemind.dht.crypto.RSASignatureValidator`). :class:`RecordValidator` runs on every record this
node is asked to store and on every record a DHT lookup returns; it accepts a record only if

- its key is the swarm's key (this DHT serves nothing else: a stranger cannot fill it with other keys);
- its subkey is exactly one owner key and ``peer`` is the peer ID of that key (with the signature
  check: only the owner of a peer ID can write its record, and nobody can write another's);
- its value has exactly the schema above, with bounded sizes, ``0 <= client < train.clients`` and
  ``-1 <= round <= train.rounds`` (a record cannot claim round 1,000,000);
- it expires at most ``record_ttl_s + CLOCK_TOLERANCE_S`` from now (a far-future expiry cannot pin it),
  "now" being the swarm's time (:func:`declora.comm.swarm_clock.now`: this machine's clock corrected by
  its measured offset, so a machine whose clock is off by minutes still accepts honest records);
- with an allowlist, its peer ID is on it (and bound to its client id, where the allowlist binds one).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from declora.comm.swarm_clock import CLOCK_TOLERANCE_S, now
from declora.errors import ConfigError
from declora.rundir import layout
from declora.rundir.protect import check_writable

MAX_MADDRS, MAX_TEXT, MAX_KEYS = 16, 256, 64
FIELDS = {"client": int, "peer": str, "round": int, "maddrs": list, "fp": str, "keys": dict, "t": float}


@dataclass(frozen=True)
class Record:
    """A peer as announced in the DHT (already validated)."""

    client: int
    peer: str
    round: int
    maddrs: tuple[str, ...]
    fp: str = ""
    keys: tuple[tuple[str, str], ...] = ()
    t: float = 0.0


class Allowlist:
    """Peer IDs allowed in the swarm, one per line: ``PEER_ID [CLIENT_ID]`` (``#`` starts a comment).

    A line with a client id binds that peer ID to that client: the peer may then speak only as it.
    """

    def __init__(self, peers: dict[str, int | None]) -> None:
        self.peers = peers

    @classmethod
    def load(cls, path: str | Path) -> Allowlist:
        peers: dict[str, int | None] = {}
        try:
            lines = Path(path).expanduser().read_text().splitlines()
        except OSError as err:
            raise ConfigError(f"swarm.allowlist_file={path}: cannot read it ({err.strerror})") from None
        for n, line in enumerate(lines, 1):
            fields = line.split("#")[0].split()
            if not fields:
                continue
            if len(fields) > 2 or (len(fields) == 2 and not fields[1].isdigit()):
                raise ConfigError(f"swarm.allowlist_file={path}:{n}: use 'PEER_ID [CLIENT_ID]' per line")
            peers[fields[0]] = int(fields[1]) if len(fields) == 2 else None
        return cls(peers)

    def allows(self, peer: str, client: int | None = None) -> bool:
        if peer not in self.peers:
            return False
        bound = self.peers[peer]
        return bound is None or client is None or bound == client


def identity_file(identity_path: str | None, out_dir: str | Path) -> tuple[Path, str]:
    """A peer's identity key file and the option that names it in messages: ``swarm.identity_path`` (``~``
    expanded), else ``<out_dir>/swarm/identity.key``."""
    if identity_path:
        return Path(identity_path).expanduser(), "swarm.identity_path"
    return layout.swarm_dir(out_dir) / layout.SWARM_IDENTITY, "out_dir (its swarm/identity.key)"


def check_identity(identity_path: str | Path, option: str = "swarm.identity_path") -> None:
    """Stop unless ``identity_path`` is an identity key this peer can read, or a file it can create.

    Raises:
        ConfigError: one line naming ``option``: a folder, an unreadable file, a file that is no libp2p
            private key, or a place where no file can be created.
    """
    from hivemind.p2p import PeerID

    path = Path(identity_path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{option}={path} is a folder; give the key file, e.g. {option}={path / 'identity.key'}")
    if not path.exists():
        check_writable(path, option, folder=False)
        return
    try:
        PeerID.from_identity(path.read_bytes())
    except OSError as err:
        raise ConfigError(f"{option}={path}: cannot read it ({err.strerror})") from None
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends: not a key
        raise ConfigError(
            f"{option}={path} is not a libp2p identity key; point it at the key this peer was given its ID with, "
            "or at a file that does not exist yet (a new key is made there)"
        ) from None


def peer_id_of(identity_path: str | Path, option: str = "swarm.identity_path") -> str:
    """The peer ID (base58) of an identity key file, creating the file if it does not exist."""
    from hivemind.p2p import P2P, PeerID

    check_identity(identity_path, option)
    path = Path(identity_path).expanduser()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(str(path))
    return PeerID.from_identity(path.read_bytes()).to_base58()


def signing_key(identity_path: str | Path) -> Any:
    """The identity's RSA key as hivemind's :class:`~hivemind.utils.crypto.RSAPrivateKey` (records are signed
    with the same key that defines the peer ID)."""
    from hivemind.proto import crypto_pb2
    from hivemind.utils.crypto import RSAPrivateKey

    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": crypto_pb2.PrivateKey.FromString(Path(identity_path).read_bytes()).data})
    return key


@functools.lru_cache(maxsize=1024)
def peer_id_of_public_key(owner: bytes) -> str:
    """The base58 peer ID of an ``ssh-rsa ...`` public key (libp2p's rule: sha2-256 multihash of the
    protobuf-wrapped DER key), as :meth:`hivemind.p2p.PeerID.from_identity` computes it for a private key."""
    import multihash
    from cryptography.hazmat.primitives import serialization
    from hivemind.p2p import PeerID
    from hivemind.proto import crypto_pb2
    from hivemind.utils.crypto import RSAPublicKey

    der = RSAPublicKey.from_bytes(owner)._public_key.public_bytes(
        encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    wrapped = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(wrapped).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(digest).to_base58()


def parse_value(value: Any, clients: int, rounds: int) -> Record:
    """A record's value checked against the schema; raises ValueError naming what is wrong."""
    if not isinstance(value, dict) or set(value) != set(FIELDS):
        raise ValueError(f"fields {sorted(value) if isinstance(value, dict) else type(value).__name__}")
    for name, kind in FIELDS.items():
        if type(value[name]) is not kind:  # strict: no bool for int, no int for float
            raise ValueError(f"{name} is {type(value[name]).__name__}, not {kind.__name__}")
    maddrs, keys = value["maddrs"], value["keys"]
    if not 0 <= value["client"] < clients or not -1 <= value["round"] <= rounds:
        raise ValueError(f"client {value['client']} or round {value['round']} out of range")
    if len(maddrs) > MAX_MADDRS or not all(isinstance(m, str) and len(m) <= MAX_TEXT for m in maddrs):
        raise ValueError("maddrs")
    if len(keys) > MAX_KEYS or not all(
        isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_TEXT and len(v) <= MAX_TEXT for k, v in keys.items()
    ):
        raise ValueError("keys")
    if len(value["peer"]) > MAX_TEXT or len(value["fp"]) > MAX_TEXT or not math.isfinite(value["t"]):
        raise ValueError("peer, fp or t")
    keys_sorted = tuple(sorted(keys.items()))
    return Record(value["client"], value["peer"], value["round"], tuple(maddrs), value["fp"], keys_sorted, value["t"])


def make_validator(
    key: str,
    clients: int,
    rounds: int,
    ttl: float,
    allowlist: Allowlist | None,
    on_reject: Callable[[str], None] | None = None,
) -> Any:
    """A hivemind record validator enforcing the rules of the module docstring (see :func:`validators`)."""
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.protocol import DHTProtocol
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord, RecordValidatorBase

    key_id = DHTID.generate(source=key).to_bytes()
    owner_re = RSASignatureValidator._PUBLIC_KEY_RE

    class RecordValidator(RecordValidatorBase):
        """Applied after the signature check (lower priority than RSASignatureValidator's 10)."""

        def validate(self, record: DHTRecord) -> bool:
            try:
                return self._check(record)
            except Exception as err:  # noqa: BLE001 - anything unparsable is simply not a valid record
                self._reject(f"malformed ({type(err).__name__})")
                return False

        def _check(self, record: DHTRecord) -> bool:
            if record.key != key_id:
                return self._reject("a key other than the swarm's")
            subkey = DHTProtocol.serializer.loads(record.subkey)
            owners = owner_re.findall(subkey) if isinstance(subkey, bytes) else []
            if len(owners) != 1 or subkey != RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", owners[0]):
                return self._reject("not signed by an owner key")
            rec = parse_value(DHTProtocol.serializer.loads(record.value), clients, rounds)
            if rec.peer != peer_id_of_public_key(owners[0]):
                return self._reject(f"peer {rec.peer[:60]} is not the owner of the signing key")
            ahead = record.expiration_time - now() - ttl
            if ahead > CLOCK_TOLERANCE_S:
                return self._reject(f"peer {rec.peer}: expiry {ahead:.0f} s beyond its TTL (forged, or its clock)")
            if allowlist is not None and not allowlist.allows(rec.peer, rec.client):
                return self._reject(f"peer {rec.peer} (client {rec.client}) is not on swarm.allowlist_file")
            return True

        def _reject(self, why: str) -> bool:
            if on_reject is not None:
                on_reject(why)
            return False

        def merge_with(self, other: RecordValidatorBase) -> bool:
            return False

    return RecordValidator()


def record_subkey(owner_key: Any) -> bytes:
    """This peer's subkey: its owner public key in RSASignatureValidator's format."""
    from hivemind.dht.crypto import RSASignatureValidator

    return RSASignatureValidator(owner_key).local_public_key


def signature_validator(owner_key: Any) -> Any:
    from hivemind.dht.crypto import RSASignatureValidator

    return RSASignatureValidator(owner_key)
