"""runtime=distributed: one process per client over torch.distributed (gloo, file:// rendezvous).

The multi-process tests fork 4 ranks from one warm launcher (tests/rank_launcher.py) and always kill
its whole process group at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ranks import Rank, assert_rows_close, launch_ranks, simulate
from safetensors.torch import load_file

from declora.comm import dist_safety
from declora.comm.distributed import DistributedCommunicator, PeerFailure, pack, unpack
from declora.comm.messages import MessageRejected
from declora.config import ConfigError, load_config
from declora.rundir.layout import read_metrics
from declora.training.trainer import run


@pytest.fixture(scope="module")
def three_rounds(tiny_bert: Path, sst2_small: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides of a 3-round tiny run on a 4-client ring (module scope: one simulation serves two tests)."""
    return [
        f"model.name_or_path={tiny_bert}",
        f"data.path={sst2_small}",
        "train.clients=4",
        "train.rounds=3",
        "train.local_steps=2",
        "train.batch_size=8",
        "peft.r=4",
        "progress=false",
        "plots=false",
    ]


@pytest.fixture(scope="module")
def simulated(three_rounds: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same config in one process."""
    return Path(simulate(three_rounds, f"out_dir={tmp_path_factory.mktemp('sim') / 'run'}")["run_dir"])


def test_pack_unpack_round_trips_mixed_dtypes_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(0)
    message = {
        "a::codes": torch.randint(0, 255, (3, 5), dtype=torch.uint8, generator=gen),
        "a::scale": torch.rand(3, 1, generator=gen),
        "b": torch.randn(4, 2, generator=gen).half(),
        "c": torch.randn(7, generator=gen, dtype=torch.float64),
        "d": torch.tensor(3.5),  # 0-d
    }
    buffer = pack(message)
    assert buffer.dtype == torch.uint8
    assert buffer.numel() == sum(t.numel() * t.element_size() for t in message.values())
    like = {k: torch.zeros_like(v) for k, v in message.items()}
    back = unpack(buffer.clone(), like)
    for k, v in message.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k].view(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
    with pytest.raises(ValueError, match="expected"):
        unpack(torch.cat([buffer, buffer[:1]]), like)


def test_distributed_needs_rank_and_a_matching_world_size(monkeypatch, tiny_overrides: list[str]) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = load_config(overrides=[*tiny_overrides, "runtime=distributed"])
    with pytest.raises(ConfigError, match="RANK and WORLD_SIZE"):
        run(cfg)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=3 but the run has 4 clients"):
        run(cfg)


def test_peer_failure_message_is_one_line_naming_peer_and_round() -> None:
    err = PeerFailure(
        2,
        3,
        1,
        "exchange with neighbour",
        "[/x/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:4: Connection reset by peer. "
        "This is typically caused by a remote worker hanging",
    )
    assert str(err) == (
        "rank 1: peer rank 2 is missing at round 3 "
        "(exchange with neighbour: Read error [127.0.0.1]:4: Connection reset by peer.)"
    )
    assert "rank unknown" in str(PeerFailure(None, 1, 0, "total", "x"))


@pytest.mark.distributed
def test_four_process_ring_equals_the_simulation(three_rounds: list[str], simulated: Path, tmp_path: Path) -> None:
    out = tmp_path / "dist"
    ranks = launch_ranks(4, [*three_rounds, f"out_dir={out}"], tmp_path)
    assert [r.rc for r in ranks] == [0, 0, 0, 0], "\n".join(r.log[-2000:] for r in ranks)

    assert_rows_close(read_metrics(out), read_metrics(simulated))
    # every rank's own rows: its own loss, accuracy and consensus term, the sum of which is the global row
    own = [read_metrics(out / "ranks" / f"rank_{r}") for r in range(4)]
    for t, row in enumerate(read_metrics(out)):
        assert [o[t]["rank"] for o in own] == [0, 1, 2, 3]
        assert np.mean([o[t]["train_loss"] for o in own]) == pytest.approx(row["train_loss"], rel=1e-12)
        assert np.mean([o[t]["squared_distance"] for o in own]) == pytest.approx(row["consensus_error"], rel=1e-12)
        assert sum(o[t]["bytes_sent"] for o in own) == row["bytes_sent"]
    # rank 0 wrote the contract; each rank its own adapter, equal to the simulated client's
    for name in (
        "config.yaml",
        "summary.json",
        "DONE",
        "adapters/average/adapter_model.safetensors",
        *(f"ranks/rank_{r}/summary.json" for r in range(4)),
    ):
        assert (out / name).is_file(), name
    for name in ["average"] + [f"client_{i}" for i in range(4)]:
        ours = load_file(str(out / "adapters" / name / "adapter_model.safetensors"))
        theirs = load_file(str(simulated / "adapters" / name / "adapter_model.safetensors"))
        for key, tensor in theirs.items():
            torch.testing.assert_close(ours[key], tensor, rtol=1e-5, atol=1e-7)


@pytest.mark.distributed
def test_killed_rank_makes_its_peers_stop_naming_it_and_resume_finishes_the_run(
    three_rounds: list[str], simulated: Path, tmp_path: Path
) -> None:
    out = tmp_path / "dist"
    args = [*three_rounds, f"out_dir={out}", "comm.timeout_s=30"]
    ranks = launch_ranks(4, args, tmp_path / "a", env={"DECLORA_FAULT": "2@2"})
    assert ranks[2].rc == 17  # the injected crash, at the start of round 2
    for r in (0, 1, 3):
        assert ranks[r].rc == 1, ranks[r].log[-2000:]
        assert "peer rank 2 is missing at round 2" in ranks[r].log
        assert ranks[r].ended - ranks[2].ended < 30  # within comm.timeout_s of the death
    errors = [line for line in ranks[1].log.splitlines() if line.startswith("declora: error")]
    assert len(errors) == 1
    assert [r["round"] for r in read_metrics(out)] == [1]

    # round 1 is the last complete checkpoint: resuming in 4 processes ends as an uninterrupted run
    ranks = launch_ranks(4, [f"resume={out}"], tmp_path / "b")
    assert [r.rc for r in ranks] == [0, 0, 0, 0], "\n".join(r.log[-2000:] for r in ranks)
    assert_rows_close(read_metrics(out), read_metrics(simulated))
    assert [r["round"] for r in read_metrics(out / "ranks" / "rank_3")] == [1, 2, 3]


@pytest.mark.distributed
def test_hung_rank_is_named_after_the_timeout(tiny_overrides: list[str], tmp_path: Path) -> None:
    args = [*tiny_overrides, f"out_dir={tmp_path / 'dist'}", "comm.timeout_s=4", "checkpoint_every=0"]
    start = time.time()
    ranks = launch_ranks(4, args, tmp_path, env={"DECLORA_FAULT": "1@2:hang"}, timeout=120, exits=3)
    assert ranks[1].rc is None  # still hanging until the launcher's group was killed
    for r in (0, 2):  # its neighbours on the ring
        assert ranks[r].rc == 1, ranks[r].log[-2000:]
        assert "is missing at round 2" in ranks[r].log, ranks[r].log[-2000:]
    # Timeouts race: rank 3 (waiting on ranks 0 and 2, themselves blocked on rank 1) can time out first and
    # record "rank 0 missing" before rank 0 records rank 1; a neighbour reading the store then may repeat
    # that record (seen once in three clean CI runs). At least one neighbour names the hung rank itself.
    assert any("peer rank 1 is missing at round 2" in ranks[r].log for r in (0, 2)), [ranks[r].log for r in (0, 2)]
    assert ranks[3].rc == 1 and "missing at round 2" in ranks[3].log
    assert max(ranks[r].ended for r in (0, 2, 3)) - start < 100


def test_launch_builds_the_torchrun_command_and_checks_the_process_count(capsys: pytest.CaptureFixture) -> None:
    from declora.cli.app import main
    from declora.launch.torchrun import torchrun_command

    cmd = torchrun_command(4, ["train.rounds=3"], config="recipe.yaml")
    loopback = ["--nnodes=1", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0"]  # not --standalone
    assert cmd[1:8] == ["-m", "torch.distributed.run", *loopback, "--nproc-per-node=4", "-m"]
    assert cmd[8:] == [
        "declora",
        "train",
        "--config",
        "recipe.yaml",
        "runtime=distributed",
        "train.clients=4",
        "train.rounds=3",
    ]
    assert main(["launch", "--clients", "4", "--dry-run", "train.rounds=3"]) == 0
    assert "--nproc-per-node=4 -m declora train runtime=distributed train.clients=4" in capsys.readouterr().err
    # an explicit train.clients that disagrees, or a pooled algorithm (1 model), stops before any process
    assert main(["launch", "--clients", "4", "--dry-run", "train.clients=3"]) == 2
    assert main(["launch", "--clients", "4", "--dry-run", "train.algorithm=centralized"]) == 2
    assert "use --clients 1" in capsys.readouterr().err


@pytest.mark.distributed
def test_quantized_choco_gossip_over_the_wire_equals_the_simulation(three_rounds: list[str], tmp_path: Path) -> None:
    """4-bit codes (packed uint8) + fp32 scales travel as bytes; CHOCO's public copies agree bit for bit."""
    args = [*three_rounds, "train.rounds=2", "comm.bits=4", "comm.error_feedback=true", "save_adapters=false"]
    sim = simulate(args, f"out_dir={tmp_path / 'sim'}")
    out = tmp_path / "dist"
    ranks = launch_ranks(4, [*args, f"out_dir={out}"], tmp_path)
    assert [r.rc for r in ranks] == [0, 0, 0, 0], "\n".join(r.log[-2000:] for r in ranks)
    rows = read_metrics(out)
    assert_rows_close(rows, read_metrics(sim["run_dir"]))
    assert rows[0]["bytes_sent"] < sim["message_bytes"] * 8 / 6  # 8 messages of ~1/8 the fp32 size


def test_wire_header_check_names_the_sender_for_every_mismatch() -> None:
    own = {"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.uint8)}
    size = pack(own).numel()
    dist_safety.check_header(dist_safety.wire_header(own, 2, 5, size), own, size, 2, 5)  # a good one passes
    short = {"a": torch.zeros(5), "b": own["b"]}
    cases = [
        (dist_safety.wire_header(own, 3, 5, size), "claims to come from client 3"),
        (dist_safety.wire_header(own, 2, 4, size), "stale or future round 4"),
        (dist_safety.wire_header(short, 2, 5, pack(short).numel()), f"payload of {size - 4} bytes, expected {size}"),
        (dist_safety.wire_header({"a": own["a"].double(), "b": own["b"]}, 2, 5, size), "wrong tensor names"),
        (torch.zeros(dist_safety.HEADER_LEN, dtype=torch.int64), "not a declora message"),
    ]
    for header, reason in cases:
        with pytest.raises(MessageRejected, match=reason) as err:
            dist_safety.check_header(header, own, size, 2, 5)
        assert (err.value.sender, err.value.round) == (2, 5)


def test_sigterm_line_names_the_local_peer_whose_process_exited() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid no longer exists
    comm = DistributedCommunicator(1, 4)
    comm.round = 3
    comm.processes = {0: dist_safety.this_process(), 2: f"{os.uname().nodename} {gone.pid}", 3: "elsewhere 1"}
    assert dist_safety.exited(comm.processes) == [2]  # alive (this process) and other machines are not listed
    assert comm.sigterm_line().startswith("rank 1: peer rank 2 is missing at round 3 (its process exited;")
    assert comm.sigterm_code() == 1
    comm.processes = {0: dist_safety.this_process()}
    assert "stopped by SIGTERM at round 3; no peer on this machine has exited" in comm.sigterm_line()
    assert comm.sigterm_code() == 143


def _errors(rank: Rank) -> list[str]:
    return [line for line in rank.log.splitlines() if line.startswith("declora: error")]


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["nan", "shape"])
def test_a_nan_or_wrong_size_message_stops_the_run_naming_its_sender(
    kind: str, tiny_overrides: list[str], tmp_path: Path
) -> None:
    """Rank 1 sends NaN (or a tensor one element short) in round 2: its ring neighbours 0 and 2 name it,
    nothing is mixed (no round 2 row or checkpoint), no process aborts inside gloo, every rank says one line."""
    ranks = launch_ranks(4, tiny_overrides, tmp_path, env={"DECLORA_POISON": f"1@2:{kind}"}, timeout=120)
    logs = "\n".join(r.log[-1500:] for r in ranks)
    assert [r.rc for r in ranks] == [1, 1, 1, 1], logs  # not -6 (SIGABRT in gloo on a size mismatch)
    reason = "non-finite values in" if kind == "nan" else "payload of"
    for r in (0, 2):
        assert f"rank {r}: peer rank 1 sent a bad message at round 2: {reason}" in ranks[r].log, logs
    assert "peer rank 1 sent a bad message at round 2" in ranks[3].log, logs  # told through the store
    assert all(len(_errors(r)) == 1 for r in ranks), logs
    out = tmp_path / "run"
    assert [r["round"] for r in read_metrics(out)] == [1]
    assert all(np.isfinite(r["train_loss"]) for r in read_metrics(out))


@pytest.mark.distributed
def test_under_a_torchrun_like_agent_every_survivor_names_the_dead_rank(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    """Rank 2 exits at the start of round 2 and the launcher SIGTERMs the others at once, as torchrun's
    agent does: each survivor still prints its one line naming rank 2 and the round."""
    args = [*tiny_overrides, "train.rounds=3", "checkpoint_every=0"]
    env = {"DECLORA_FAULT": "2@2", "DECLORA_TEST_AGENT": "1"}
    ranks = launch_ranks(4, args, tmp_path, env=env, timeout=120)
    assert ranks[2].rc == 17
    for r in (0, 1, 3):
        assert ranks[r].rc == 1, ranks[r].log[-2000:]
        assert len(_errors(ranks[r])) == 1 and "peer rank 2 is missing at round 2" in _errors(ranks[r])[0]
        assert ranks[r].ended - ranks[2].ended < 10


@pytest.mark.distributed
def test_sigterm_while_blocked_in_a_gloo_wait_prints_one_line_at_once(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    """Rank 2 hangs in round 2, so its neighbours block inside gloo (timeout 60 s); SIGTERM to the
    others makes each print its line and exit within seconds, not after the timeout."""
    args = [*tiny_overrides, "comm.timeout_s=60", "checkpoint_every=0"]
    sent: list[float] = []

    def poke(logs: Path) -> None:
        hanging = logs / "rank_2.log"
        if not sent and hanging.is_file() and "hangs at round 2" in hanging.read_text():
            time.sleep(2)  # the others reach the exchange and block in it
            for r in (0, 1, 3):
                os.kill(int((logs / f"rank_{r}.pid").read_text()), signal.SIGTERM)
            sent.append(time.time())

    ranks = launch_ranks(4, args, tmp_path, env={"DECLORA_FAULT": "2@2:hang"}, timeout=90, exits=3, poke=poke)
    assert sent
    for r in (0, 1, 3):
        assert ranks[r].rc == 143, ranks[r].log[-2000:]
        assert _errors(ranks[r]) == [
            f"declora: error: rank {r}: stopped by SIGTERM at round 2; no peer on this machine has exited (a peer "
            "on another machine failed, or the run was cancelled: see the launcher's log)"
        ]
        assert ranks[r].ended - sent[0] < 5
