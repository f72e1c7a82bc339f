"""The run-folder names are pinned: runs made by earlier versions must still resume and load."""

from __future__ import annotations

from pathlib import Path

from declora.rundir import layout

# The contract as every run so far wrote it. Changing a name here breaks resuming and loading old runs.
PINNED = {
    "CONFIG": "config.yaml",
    "ENVIRONMENT": "environment.json",
    "METRICS": "metrics.jsonl",
    "SUMMARY": "summary.json",
    "DONE": "DONE",
    "ADAPTERS": "adapters",
    "PLOTS": "plots",
    "CHECKPOINTS": "checkpoints",
    "RANKS": "ranks",
    "SWARM": "swarm",
    "MARKER": "COMPLETE.json",
    "CLEANED": "CLEANED.txt",
    "AVERAGE": "average",
    "BEST": "best",
    "ADAPTER_METADATA": "declora.json",
    "MODEL_CARD": "README.md",
    "PEFT_CONFIG": "adapter_config.json",
    "PEFT_WEIGHTS": "adapter_model.safetensors",
    "HEAD_WEIGHTS": "head.safetensors",
    "SWARM_LIVE": "live.jsonl",
    "SWARM_ADDRESS": "address.txt",
    "SWARM_STATE": "state.pt",
    "SWARM_IDENTITY": "identity.key",
}


def test_the_names_are_those_of_earlier_runs() -> None:
    assert {name: getattr(layout, name) for name in PINNED} == PINNED


def test_paths_and_round_numbers() -> None:
    run = Path("run")
    assert layout.round_dir(run, 7) == Path("run/checkpoints/round_000007")
    assert layout.rank_file(run, 7, 2) == Path("run/checkpoints/round_000007/rank_2.pt")
    assert layout.rank_dir(run, 3) == Path("run/ranks/rank_3")
    assert layout.adapter_dir(run, layout.client_adapter(4)) == Path("run/adapters/client_4")
    assert layout.peer_dir("base", 1) == Path("base/peer_1")
    assert layout.round_of(layout.round_dir(run, 12)) == 12
    assert layout.round_of(Path("round_x")) == -1 and layout.round_of(Path("CLEANED.txt")) == -1
    assert Path("round_000012").match(layout.ROUND_GLOB) and Path("rank_0.pt").match(layout.RANK_FILE_GLOB)


def test_read_metrics_skips_blank_lines(tmp_path: Path) -> None:
    (tmp_path / layout.METRICS).write_text('{"round": 1}\n\n{"round": 2}\n')
    assert layout.read_metrics(tmp_path) == [{"round": 1}, {"round": 2}]
