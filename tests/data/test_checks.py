"""Data problems are named (file, row, option) before the model loads (declora.data.checks; from
test_trust.py, issue 13)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import no_model, one_error

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest


@pytest.mark.parametrize(
    "train_tsv,needle",
    [
        ("", "train.tsv is empty"),
        ("sentence\tlabel\n", "train.tsv has a header line but no examples"),
        ("sentence\tlabel\ngood\t1\n\t\nbad\t0\n", "train.tsv line 3 has no label"),
        ("sentence\tlabel\ngood\t1\nbad\t0.5\n", "train.tsv line 3: label=0.5 is not a class label"),
    ],
)
def test_data_problems_name_the_file_and_row_before_the_model(
    train_tsv: str,
    needle: str,
    tiny_bert: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text(train_tsv)
    (data / "test.tsv").write_text("sentence\tlabel\ngood\t1\n")
    no_model(monkeypatch)
    argv = ["train", f"model.name_or_path={tiny_bert}", f"data.path={data}", f"out_dir={tmp_path / 'run'}"]
    line = one_error(capsys, argv, 2)
    assert needle in line and str(data) in line


def test_float_labels_without_gaps_are_read_as_integers(tmp_path: Path) -> None:
    from declora.config import DataConfig
    from declora.data.loading import load_train_labels

    (tmp_path / "train.csv").write_text("text,label\ngood,1.0\nbad,0.0\nfine,1.0\n")
    cfg = DataConfig(task="generic", path=str(tmp_path), text_column="text", label_column="label")
    labels, names, _ = load_train_labels(cfg)
    assert labels.tolist() == [1, 0, 1] and names == ["0", "1"]


def test_proportions_longer_than_the_classes_are_a_data_error(
    tiny_overrides: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    no_model(monkeypatch)
    props = "partition.proportions=[[0.2,0.3,0.5]]"
    line = one_error(capsys, ["train", *tiny_overrides, "partition.kind=label_proportions", props], 2)
    assert "3 entries" in line and "2 classes (negative, positive)" in line
    line = one_error(
        capsys, ["partition", "label_proportions", "--clients", "2", "--proportions", "[[0.2,0.3,0.5]]"], 2
    )
    assert "2 classes" in line
