"""Per-group clipping (privacy.clipping=per_group): each group within its bound, the joint norm within C."""

from __future__ import annotations

import math

import pytest
import torch

from declora.client.dp_clipping import clip_and_sum, clip_groups, clip_groups_and_sum, is_head
from declora.config import ConfigError, PrivacyConfig

NAMES = [
    "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight",
    "base_model.model.bert.encoder.layer.0.attention.self.value.lora_B.default.weight",
    "base_model.model.classifier.modules_to_save.default.weight",
    "base_model.model.classifier.modules_to_save.default.bias",
]


def _grads(b: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 4), (8, 4), (2, 8), (2,)]
    scales = [0.05, 0.1, 3.0, 1.0]  # the head dominates the norm, as with a fresh classifier
    return {n: s * torch.randn((b, *sh), generator=g) for n, sh, s in zip(NAMES, shapes, scales, strict=True)}


def test_groups_split_c_squared_between_head_and_adapters() -> None:
    groups = clip_groups(NAMES, 0.1, "per_group", 0.25)
    assert [is_head(n) for n in NAMES] == [False, False, True, True]
    assert groups[NAMES[2]] == ("head", pytest.approx(0.05)) and groups[NAMES[0]][0] == "adapters"
    assert groups[NAMES[2]][1] ** 2 + groups[NAMES[0]][1] ** 2 == pytest.approx(0.1**2)
    assert set(clip_groups(NAMES, 0.1, "flat", 0.25).values()) == {("all", 0.1)}
    only_adapters = NAMES[:2]  # no head trained: the adapters get all of C
    assert set(clip_groups(only_adapters, 0.1, "per_group", 0.25).values()) == {("all", 0.1)}


@pytest.mark.parametrize("share", [0.5, 0.1, 0.9])
def test_every_example_stays_within_its_group_bounds_and_c(share: float) -> None:
    grads, c = _grads(), 0.5
    groups = clip_groups(NAMES, c, "per_group", share)
    for k in range(8):  # one example at a time: its clipped vector is the sum over a batch of one
        one = {n: g[k : k + 1] for n, g in grads.items()}
        summed, norms, clipped = clip_groups_and_sum(one, groups)
        head = math.sqrt(sum(summed[n].pow(2).sum() for n in NAMES[2:]))
        rest = math.sqrt(sum(summed[n].pow(2).sum() for n in NAMES[:2]))
        assert head <= c * math.sqrt(share) * (1 + 1e-5) and rest <= c * math.sqrt(1 - share) * (1 + 1e-5)
        assert math.hypot(head, rest) <= c * (1 + 1e-5)
        joint = math.sqrt(sum(g.pow(2).sum() for g in one.values()))
        assert norms.item() == pytest.approx(joint, rel=1e-5)
        assert bool(clipped) == (head < math.sqrt(sum(g.pow(2).sum() for g in list(one.values())[2:])) - 1e-6)


def test_per_group_gives_the_adapters_their_share_where_flat_starves_them() -> None:
    grads, c = _grads(), 0.5
    flat, _ = clip_and_sum(grads, c)
    split, _, _ = clip_groups_and_sum(grads, clip_groups(NAMES, c, "per_group", 0.5))
    adapters = lambda s: math.sqrt(sum(s[n].pow(2).sum() for n in NAMES[:2]))  # noqa: E731
    assert adapters(split) > 5 * adapters(flat)


def test_one_group_is_the_flat_rule_bit_for_bit_and_a_loose_bound_is_the_plain_sum() -> None:
    grads = _grads()
    flat, flat_norms = clip_and_sum(grads, 0.5)
    same, norms, clipped = clip_groups_and_sum(grads, clip_groups(NAMES, 0.5, "flat", 0.5))
    assert all(torch.equal(flat[n], same[n]) for n in NAMES) and torch.equal(norms, flat_norms)
    assert torch.equal(clipped, flat_norms > 0.5)
    loose, _, none_clipped = clip_groups_and_sum(grads, clip_groups(NAMES, 1e9, "per_group", 0.3))
    for n in NAMES:
        torch.testing.assert_close(loose[n], grads[n].sum(0), rtol=1e-5, atol=2e-5)
    assert not none_clipped.any()


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [({"clipping": "layer"}, "privacy.clipping"), ({"head_clip_share": 1.0}, "privacy.head_clip_share")],
)
def test_bad_clipping_options_name_the_flag(kwargs: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        PrivacyConfig(mechanism="dp_sgd", noise_multiplier=1.0, **kwargs)


def test_a_per_group_run_spends_the_same_epsilon_and_records_its_rule(tiny_overrides: list[str], tmp_path) -> None:
    """Same sigma, same steps: per_group changes the update, never the accounting; summary.json says which rule."""
    from declora.config import load_config
    from declora.rundir.layout import read_metrics
    from declora.training.trainer import run

    common = [*tiny_overrides, "privacy.mechanism=dp_sgd", "privacy.noise_multiplier=1.0", "privacy.max_grad_norm=0.05"]
    flat = run(load_config(overrides=[*common, f"out_dir={tmp_path / 'flat'}"]))
    split = run(
        load_config(
            overrides=[
                *common,
                "privacy.clipping=per_group",
                "privacy.head_clip_share=0.3",
                f"out_dir={tmp_path / 's'}",
            ]
        )
    )
    assert split["epsilon"] == flat["epsilon"]
    assert split["privacy"]["clipping"] == "per_group" and split["privacy"]["head_clip_share"] == 0.3
    assert flat["privacy"]["clipping"] == "flat" and flat["privacy"]["head_clip_share"] is None
    rows = read_metrics(split["run_dir"])
    assert all(0.0 <= r["clipped_fraction"] <= 1.0 for r in rows if r.get("clipped_fraction") is not None)
    assert read_metrics(flat["run_dir"])[-1]["train_loss"] != rows[-1]["train_loss"]  # the update did change
