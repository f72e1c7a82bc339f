"""``train.availability_file``: a reproducible schedule of which peers are offline in which rounds.

One entry = a round range and a set of peers offline in it. YAML (a list of mappings) or CSV (a
header ``rounds,offline``). A round range is ``5`` (one round), ``5-8`` (inclusive) or ``4-`` (round 4
and every later one: the peer leaves for good). Peers are ids ``0..N-1``: ``3``, ``0-4``, ``[0, 1, 4]``
or ``"0-4 7"`` (space- or semicolon-separated in a CSV cell; commas too when the cell is quoted).

```yaml
- {rounds: 5-8, offline: 0-4}      # peers 0..4 offline in rounds 5..8
- {rounds: 4-, offline: 3}         # peer 3 leaves at round 4 and never comes back
```

```text
rounds,offline
5-8,0-4
4-,3
```

Entries add up (a peer is offline in a round if any entry says so). Membership follows from them: a
peer offline from round R on for good has *left* at R, one offline in every round 1..t has *not joined*
by t; every other offline round is a temporary outage (:meth:`Schedule.left`,
:meth:`Schedule.not_joined`, used by :meth:`declora.mixing.churn.Churn.members`). The file is read and checked when
the config is loaded, so a peer id >= N or a round < 1 stops the run before any model is loaded.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from declora.errors import ConfigError

OPTION = "train.availability_file"


@dataclass(frozen=True)
class Outage:
    """Peers offline from round ``first`` to ``last`` inclusive (``last=None``: for good)."""

    first: int
    last: int | None
    peers: frozenset[int]


@dataclass(frozen=True)
class Schedule:
    """The parsed schedule: a list of outages."""

    outages: tuple[Outage, ...]

    def offline(self, round_: int) -> frozenset[int]:
        """The peers the schedule takes offline in ``round_``."""
        out: set[int] = set()
        for o in self.outages:
            if o.first <= round_ and (o.last is None or round_ <= o.last):
                out |= o.peers
        return frozenset(out)

    def left(self, round_: int) -> frozenset[int]:
        """Peers that left for good by ``round_``: offline in ``round_`` and in every later round.

        After the last round any entry names, only open-ended entries (``R-``) are in force, so the
        rounds from ``round_`` to one past that one decide it.
        """
        horizon = max([round_, *(o.last if o.last is not None else o.first for o in self.outages)]) + 1
        gone = set(self.offline(round_))
        for r in range(round_ + 1, horizon + 1):
            gone &= self.offline(r)
        return frozenset(gone)

    def not_joined(self, round_: int) -> frozenset[int]:
        """Peers that have not joined by ``round_``: offline in every round from 1 to ``round_``."""
        waiting = set(self.offline(1))
        for r in range(2, round_ + 1):
            waiting &= self.offline(r)
        return frozenset(waiting)


def _fail(path: str | Path, what: str) -> ConfigError:
    return ConfigError(f"{OPTION}={path}: {what}")


def _range(text: str, path: str | Path, what: str, open_end: bool) -> tuple[int, int | None]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:(-)\s*(\d*)\s*)?", text)
    if m is None or (m.group(2) and not m.group(3) and not open_end):
        raise _fail(path, f"{what} {text!r} is not N, A-B{' or A-' if open_end else ''}")
    first = int(m.group(1))
    last = None if m.group(2) and not m.group(3) else int(m.group(3) or first)
    if last is not None and last < first:
        raise _fail(path, f"{what} {text!r} ends before it starts")
    return first, last


def _rounds(value: Any, path: str | Path) -> tuple[int, int | None]:
    first, last = _range(str(value), path, "rounds", open_end=True)
    if first < 1:
        raise _fail(path, f"rounds {value!r}: rounds start at 1")
    return first, last


def _peers(value: Any, n: int, path: str | Path) -> frozenset[int]:
    items = value if isinstance(value, list) else re.split(r"[\s,;]+", str(value).strip())
    peers: set[int] = set()
    for item in items:
        if str(item).strip() == "":
            continue
        first, last = _range(str(item), path, "offline peers", open_end=False)
        peers |= set(range(first, (last if last is not None else first) + 1))
    if not peers:
        raise _fail(path, f"offline peers {value!r}: name at least one peer")
    bad = sorted(p for p in peers if p >= n)
    if bad:
        raise _fail(path, f"peer {bad[0]} does not exist: the run has train.clients={n} (ids 0..{n - 1})")
    return frozenset(peers)


def _csv_entries(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(``line N``, entry) of a CSV schedule; a malformed line is named by its number."""
    rows: list[tuple[int, list[str]]] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, strict=True)
        try:
            for r in reader:
                if r and not r[0].lstrip().startswith("#"):
                    rows.append((reader.line_num, r))
        except csv.Error as err:
            raise _fail(path, f"line {reader.line_num}: cannot parse it as CSV ({err})") from None
    if not rows or [c.strip() for c in rows[0][1][:2]] != ["rounds", "offline"]:
        raise _fail(path, "a CSV schedule needs the header `rounds,offline`")
    for line, r in rows[1:]:
        if len(r) < 2:
            raise _fail(path, f"line {line}: {','.join(r)!r} needs two cells, rounds,offline (e.g. 5-8,0-4)")
    return [(f"line {line}", {"rounds": r[0], "offline": ",".join(r[1:])}) for line, r in rows[1:]]


def _yaml_entries(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(``entry N``, entry) of a YAML schedule; a YAML syntax error is named by its line."""
    import yaml
    from omegaconf import OmegaConf

    try:
        raw = OmegaConf.to_container(OmegaConf.load(path)) or []
    except yaml.YAMLError as err:
        mark, opened = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        if mark is not None and opened is not None and opened.line != mark.line:
            where = f"line {mark.line + 1} (in what line {opened.line + 1} opened): "
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise _fail(path, f"{where}not valid YAML ({problem})") from None
    if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
        raise _fail(path, "a YAML schedule is a list of {rounds: ..., offline: ...} entries")
    return [(f"entry {k}", e) for k, e in enumerate(raw, 1)]


def _entries(path: Path) -> list[tuple[str, dict[str, Any]]]:
    return _csv_entries(path) if path.suffix.lower() == ".csv" else _yaml_entries(path)


def load_schedule(path: str | Path, num_clients: int) -> Schedule:
    """Read and check a schedule for ``num_clients`` peers.

    Raises:
        ConfigError: one line naming ``train.availability_file``, the file and the bad entry.
    """
    p = Path(path)
    if not p.is_file():
        raise _fail(path, "no such file")
    try:
        entries = _entries(p)
    except ConfigError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as err:
        raise _fail(path, f"cannot read it ({str(err).splitlines()[0]})") from None
    outages = []
    for where, e in entries:
        if set(e) != {"rounds", "offline"}:
            raise _fail(path, f"{where} {e} must have exactly the keys rounds and offline")
        try:
            first, last = _rounds(e["rounds"], path)
            outages.append(Outage(first, last, _peers(e["offline"], num_clients, path)))
        except ConfigError as err:  # the same message, told where in the file
            raise ConfigError(str(err).replace(f"{OPTION}={path}: ", f"{OPTION}={path}: {where}: ", 1)) from None
    return Schedule(tuple(outages))
