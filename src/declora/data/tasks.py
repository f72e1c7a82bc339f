"""The tasks declora knows by name, and the in-memory form of a tokenized task."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's data lives and what its columns mean."""

    text_column: str
    label_column: str
    label_names: tuple[str, ...]
    local_eval_split: str  # file stem of the held-out split in a local directory
    hub_path: tuple[str, str | None]  # load_dataset(*hub_path)
    hub_eval_split: str


TASKS: dict[str, TaskSpec] = {
    # The shared SST-2 test.tsv is the GLUE validation split: the set papers report SST-2 accuracy on.
    "sst2": TaskSpec("sentence", "label", ("negative", "positive"), "test", ("glue", "sst2"), "validation"),
    "agnews": TaskSpec("text", "label", ("World", "Sports", "Business", "Sci/Tech"), "test", ("ag_news", None), "test"),
}


@dataclass
class TokenizedSplit:
    """One split, tokenized: ``input_ids[i]`` is a list of token ids, ``labels`` an int64 array."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: np.ndarray
    # causal_lm: per-token targets, -100 on prompt tokens (see declora.causal); collate passes them as labels
    lm_labels: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class TaskData:
    train: TokenizedSplit
    eval: TokenizedSplit
    label_names: list[str]
    pad_token_id: int
    source: str  # where the data came from, recorded in summary.json
    scoring: str = "classifier"  # how evaluate() scores it: classifier, verbalizer, answer_tokens
    verbalizer_ids: list[list[int]] | None = None  # scoring=verbalizer: each label's answer tokens

    @property
    def num_labels(self) -> int:
        return len(self.label_names)
