"""Golden numbers: a pinned tiny-model trajectory, the way torchtune pins its recipe losses.

Three runs on the tiny BERT (3 clients on a ring, 3 rounds x 3 local steps of 8 sentences, lr 5e-3,
r=4): exact Dec-LoRA gossip, DeCAF product mixing and 4-bit CHOCO gossip. Every per-round loss,
accuracy and consensus error is pinned to 1e-6, so a change that shifts a run's numbers at all fails
here, even when every invariant still holds. The values were produced by the code before the mixing
kernel was factored out (commit 715bbbc) and reproduced bit for bit after it.

To re-pin deliberately (a change that is *meant* to move the numbers): run
``python tests/test_golden.py`` and paste the printed ``GOLDEN`` dict here, saying why in the commit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from declora.config import load_config
from declora.rundir.layout import read_metrics
from declora.training.trainer import run

KEYS = ("round", "train_loss", "accuracy", "eval_loss", "consensus_error", "bytes_sent")
VARIANTS = {
    "dec_lora": [],
    "dec_decaf": ["train.algorithm=dec_decaf"],
    "choco4": ["comm.bits=4", "comm.error_feedback=true"],
}
GOLDEN = {  # variant -> rows of KEYS: round, train_loss, accuracy, eval_loss, consensus_error, bytes_sent
    "dec_lora": [
        (1, 0.6902933716773987, 0.48333333333333334, 0.6943007111549377, 0.015714254885861843, 51504),
        (2, 0.693923122353024, 0.48333333333333334, 0.6936997175216675, 0.014021243643331321, 51504),
        (3, 0.7022995021608142, 0.5166666666666667, 0.6927875876426697, 0.007264499615747617, 51504),
    ],
    "dec_decaf": [  # re-pinned (issue 23): averaged model = exact mean product, consensus error on products
        (1, 0.6902933716773987, 0.48333333333333334, 0.6943004727363586, 0.012947230252905133, 51504),
        (2, 0.6939258906576368, 0.48333333333333334, 0.6936996579170227, 0.009800836889379107, 51504),
        (3, 0.7022985219955444, 0.5166666666666667, 0.6927878856658936, 0.004041722017737983, 51504),
    ],
    "choco4": [
        (1, 0.6902933716773987, 0.48333333333333334, 0.6943007111549377, 0.015854363614885226, 6726),
        (2, 0.6939297119776408, 0.48333333333333334, 0.6937001347541809, 0.01429641035394739, 6726),
        (3, 0.7023696104685465, 0.5166666666666667, 0.6927866339683533, 0.007448629514251494, 6726),
    ],
}


def golden_run(model: Path, data: Path, out: Path, variant: str) -> list[dict]:
    overrides = [
        f"model.name_or_path={model}",
        f"data.path={data}",
        "train.clients=3",
        "train.rounds=3",
        "train.local_steps=3",
        "train.batch_size=8",
        "train.lr=5e-3",
        "peft.r=4",
        "progress=false",
        "plots=false",
        "save_adapters=false",
        f"out_dir={out}",
        *VARIANTS[variant],
    ]
    summary = run(load_config(overrides=overrides))
    return [{k: row[k] for k in KEYS} for row in read_metrics(summary["run_dir"])]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_golden_trajectory(variant: str, tiny_bert: Path, sst2_small: Path, tmp_path: Path) -> None:
    rows = golden_run(tiny_bert, sst2_small, tmp_path / variant, variant)
    assert [r["round"] for r in rows] == [g[0] for g in GOLDEN[variant]]
    for got, pinned in zip(rows, GOLDEN[variant], strict=True):
        want = dict(zip(KEYS, pinned, strict=True))
        assert got["bytes_sent"] == want["bytes_sent"]
        for key in ("train_loss", "accuracy", "eval_loss", "consensus_error"):
            assert got[key] == pytest.approx(want[key], abs=1e-6, rel=0), (variant, got["round"], key)


if __name__ == "__main__":  # re-pin: print the current numbers in GOLDEN's format
    import tempfile

    from conftest import make_sst2_small, make_tiny_bert  # also sets the offline environment variables

    with tempfile.TemporaryDirectory() as tmp:
        model, data = make_tiny_bert(Path(tmp) / "model"), make_sst2_small(Path(tmp) / "data")
        for v in VARIANTS:
            print(f'    "{v}": [')
            for row in golden_run(model, data, Path(tmp) / v, v):
                print("        (" + ", ".join(repr(row[k]) for k in KEYS) + "),")
            print("    ],")
