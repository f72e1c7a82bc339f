"""``declora reproduce``: recipes parse, runs execute as subprocesses, reports hold the runs' numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from declora.cli.app import main
from declora.config import ConfigError
from declora.experiments.page import GENERATED_MARKER, collect
from declora.experiments.report import check_lines, spearman, title
from declora.experiments.reproduce import (
    find_experiment,
    list_experiments,
    load_experiment,
    run_experiment,
)


def test_every_shipped_recipe_parses_and_its_runs_validate() -> None:
    """Each recipe's every run loads as a config at both scales (a typo in a recipe fails here)."""
    from declora.experiments.reproduce import validate

    experiments = list_experiments()
    names = {e.name for e in experiments}
    assert {
        "topology",
        "rank_clients",
        "quantized_base",
        "label_skew",
        "peft_baselines",
        "dirichlet_sweep",
        "consensus",
    } <= names
    for exp in experiments:
        for scale in ("cpu", "paper"):
            validate(exp, scale, Path("unused"))


def test_unknown_experiment_names_the_list_command() -> None:
    with pytest.raises(ConfigError, match="declora reproduce --list"):
        find_experiment("no_such_experiment")


def test_bad_check_kind_is_rejected(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("runs:\n  - {name: a, overrides: []}\nchecks:\n  - {kind: better}\n")
    with pytest.raises(ConfigError, match="check kind 'better'"):
        load_experiment(recipe)


def test_within_is_two_sided_and_at_least_one_sided() -> None:
    def record(acc: float) -> SimpleNamespace:
        return SimpleNamespace(_summary={"best_accuracy": acc}, metrics=[], path=Path("."))

    records = {"ref": record(0.80), "better": record(0.84), "close": record(0.795), "worse": record(0.70)}
    checks = [{"kind": k, "reference": "ref", "tolerance_pp": 1.0} for k in ("within", "at_least")]
    lines = check_lines(SimpleNamespace(checks=checks), records)
    assert lines[0].startswith("better: 84.00 vs ref 80.00 (+4.00 pp)") and "NOT within 1 pp" in lines[0]
    assert "— within 1 pp" in lines[1] and "NOT within" in lines[2]
    assert "at least as good" in lines[3] and "at least as good" in lines[4] and "worse by > 1 pp" in lines[5]


def test_best_column_is_named_for_the_split_that_picked_its_round() -> None:
    def record(selected_on: str) -> SimpleNamespace:
        return SimpleNamespace(_summary={"best_round_selected_on": selected_on}, metrics=[], path=Path("."))

    assert title("best_accuracy", [record("validation"), record("validation")]) == "best acc %"
    assert title("best_accuracy", [record("validation"), record("test")]) == "max test acc %"
    assert title("final_accuracy", [record("test")]) == "final acc %"


def test_a_page_for_one_experiment_keeps_every_other_section(tmp_path: Path) -> None:
    """`--page` with one experiment rewrites that section only: the others, the intro and the text above the
    marker stay (the earlier code dropped every section it was not asked about)."""
    page = tmp_path / "results.md"
    body = "## alpha: first\n\n| a |\n\n## beta: second\n\n| b |\n"
    page.write_text(f"# Results\n\nhand-written\n{GENERATED_MARKER}\n\nintro line\n\n{body}")
    collect([], "cpu", tmp_path / "out", page)
    text = page.read_text()
    assert text.startswith("# Results\n\nhand-written\n") and "intro line" in text
    assert text.index("## alpha: first") < text.index("| a |") < text.index("## beta: second") < text.index("| b |")


def test_spearman_signs() -> None:
    assert spearman([0.1, 0.5, 0.9], [3.0, 2.0, 1.0]) == -1.0
    assert spearman([0.1, 0.5, 0.9], [1.0, 2.0, 3.0]) == 1.0


def _recipe(tmp_path: Path, tiny_bert: Path, sst2_small: Path) -> Path:
    folder = tmp_path / "recipes"
    folder.mkdir()
    common = [
        f"model.name_or_path={tiny_bert}",
        f"data.path={sst2_small}",
        "train.clients=3",
        "train.rounds=2",
        "train.local_steps=1",
        "train.batch_size=8",
        "peft.r=2",
        "plots=false",
        "save_adapters=false",
        "eval.client_max_examples=16",
    ]
    (folder / "mini.yaml").write_text(
        json.dumps(
            {
                "name": "mini",
                "title": "ring vs complete",
                "common": common,
                "scales": {"cpu": ["data.max_eval_examples=40"]},
                "runs": [
                    {"name": "ring", "overrides": ["topology.kind=ring"], "paper": 90.0},
                    {"name": "complete", "overrides": ["topology.kind=complete"]},
                    {"name": "centralized", "overrides": ["train.algorithm=centralized"]},
                ],
                "columns": ["best_accuracy", "spectral_gap", "mean_consensus_error"],
                "checks": [
                    {"kind": "within", "metric": "best_accuracy", "reference": "centralized", "tolerance_pp": 100}
                ],
            }
        )
    )
    (folder / "twin.yaml").write_text(
        json.dumps(
            {
                "name": "twin",
                "common": common,
                "scales": {"cpu": ["data.max_eval_examples=40"]},
                "runs": [{"name": "same ring", "overrides": ["topology.kind=ring"]}],
            }
        )
    )
    return folder


def test_reproduce_runs_reports_and_reuses(
    tiny_bert: Path, sst2_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipes, out = _recipe(tmp_path, tiny_bert, sst2_small), tmp_path / "out"
    exp = find_experiment("mini", recipes)
    report = run_experiment(exp, "cpu", out, jobs=2)
    text = report.read_text()
    for run in ("ring", "complete", "centralized"):
        summary = json.loads((out / "mini" / run / "summary.json").read_text())
        assert f"| {run} |" in text
        assert f"{100 * summary['best_accuracy']:.2f}" in text  # the table holds the run's own number
    assert "| 90.0 |" in text  # the paper's number beside ours
    assert "within 100 pp" in text and "declora train" in text
    assert (out / "mini" / "compare.png").is_file() and (out / "mini" / "results.csv").is_file()
    # A second call trains nothing: finished runs are kept (an interrupted experiment continues).
    stamp = (out / "mini" / "ring" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["reproduce", "mini", "--recipes", str(recipes), "--out", str(out)]) == 0
    assert "start" not in capsys.readouterr().out
    assert (out / "mini" / "ring" / "summary.json").stat().st_mtime_ns == stamp
    # Another experiment's run with the same resolved config is reused, not retrained.
    run_experiment(find_experiment("twin", recipes), "cpu", out)
    twin = json.loads((out / "twin" / "same_ring" / "summary.json").read_text())
    assert twin == json.loads((out / "mini" / "ring" / "summary.json").read_text())
    # One results page over both experiments, plots copied beside it.
    page = tmp_path / "docs" / "results.md"
    assert main(["reproduce", "mini", "twin", "--recipes", str(recipes), "--out", str(out), "--page", str(page)]) == 0
    text = page.read_text()
    assert "## mini: ring vs complete" in text and "## twin" in text and "(results/mini.png)" in text
    assert text.startswith("# Results (cpu scale)\n\n" + GENERATED_MARKER)  # the title is hand-editable
    assert (tmp_path / "docs" / "results" / "mini.png").is_file()
    # An experiment with no finished run under --out keeps the section the page already had.
    twin_section = "## twin" + text.split("## twin", 1)[1]
    shutil.rmtree(out / "twin")
    assert main(["reproduce", "mini", "twin", "--recipes", str(recipes), "--out", str(out), "--page", str(page)]) == 0
    assert twin_section.strip() in page.read_text() and "Not run yet: same ring" not in page.read_text()
    # Text written above the marker survives a regeneration; the tables below it are rewritten.
    page.write_text("# Our summary\nring is fine.\n" + GENERATED_MARKER + "\nstale table\n")
    assert main(["reproduce", "mini", "--recipes", str(recipes), "--out", str(out), "--page", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Our summary\nring is fine.\n" + GENERATED_MARKER)
    assert "stale table" not in text and "## mini: ring vs complete" in text and "## twin" not in text


def test_dry_run_prints_the_commands_and_a_bad_override_stops_first(
    tiny_bert: Path, sst2_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipes = _recipe(tmp_path, tiny_bert, sst2_small)
    assert main(["reproduce", "mini", "--recipes", str(recipes), "--dry-run", "--out", "o"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("declora train ") for line in lines)
    assert lines[0].endswith("out_dir=o/mini/ring")
    # --only narrows the dry run too; a name that is no run stops (it would have run nothing)
    assert main(["reproduce", "mini", "--recipes", str(recipes), "--dry-run", "--out", "o", "--only", "ring"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == lines[:1]
    assert main(["reproduce", "mini", "--recipes", str(recipes), "--out", "o", "--only", "rong"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("declora: error: --only 'rong': no run is called that; the runs: 'ring'")
    recipe = recipes / "mini.yaml"
    recipe.write_text(recipe.read_text().replace("topology.kind=ring", "topology.kind=rong"))
    assert main(["reproduce", "mini", "--recipes", str(recipes), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "mini / ring" in err and "topology.kind" in err
    assert not (tmp_path / "o").exists()
