"""``data.*``: the task data, where it is read from and how it is tokenized."""

from __future__ import annotations

from dataclasses import dataclass

from declora.config.fields import _choice, _f
from declora.errors import ConfigError


@dataclass
class DataConfig:
    task: str = _f("sst2", "sst2, agnews, or 'generic' (then give text_column/label_column and path).")
    path: str | None = _f(
        None,
        "Directory with <split>.tsv/.csv/.jsonl/.parquet files. null: look in ./data/<task> and "
        "../shared/data/<task>, then the Hugging Face hub.",
    )
    text_column: str | None = _f(None, "Text column; null = the task's default.")
    text_pair_column: str | None = _f(None, "Optional second text column (sentence pairs).")
    label_column: str | None = _f(None, "Label column; null = the task's default.")
    train_split: str = _f("train", "Split used for training.")
    eval_split: str | None = _f(None, "Held-out split; null = the task's default (sst2: test = GLUE validation).")
    max_train_examples: int | None = _f(None, "Keep a seeded random subset of the training split.")
    max_eval_examples: int | None = _f(None, "Keep a seeded random subset of the held-out split.")
    validation_split: str = _f(
        "auto",
        "Split that picks the best round (summary best_round, adapters/best); the held-out split is what is "
        "reported. auto = the data's dev split (a local dev/validation/val file) if it has one, else none "
        "(best_round then picked on the held-out split); none; or a split name. See declora.data.validation.",
    )
    max_validation_examples: int | None = _f(
        500, "Seeded subset of the validation split scored each round (its cost per round); null = all of it."
    )
    group_by_length: bool = _f(
        False,
        "Batch examples of similar length (HF Trainer's group_by_length): each client's epoch is shuffled, "
        "sorted by length within mega-batches of up to 50 batches, cut into batches, and the batches shuffled; "
        "less padding per batch. Seeded and resumable.",
    )
    template: str | None = _f(
        None,
        "model.task_type=causal_lm: the prompt, with {column} fields, e.g. 'Review: {sentence}\\nSentiment:'. "
        "null = the task's default (sst2/agnews), '{<prompt_column>}\\n' for prompt/answer data.",
    )
    verbalizers: list[str] | None = _f(
        None,
        "causal_lm: the answer text of each label, in label order (mind the leading space), e.g. "
        "[' negative', ' positive']; null = the task's default, ' <label name>' for generic labels.",
    )
    prompt_column: str | None = _f(
        None, "causal_lm instruction data (e.g. JSONL): column filling the template; with data.answer_column."
    )
    answer_column: str | None = _f(
        None, "causal_lm instruction data: the target text (the loss covers only its tokens + eos)."
    )

    def __post_init__(self) -> None:
        _choice("data.task", self.task, ("sst2", "agnews", "generic"))
        if (self.prompt_column is None) != (self.answer_column is None):
            raise ConfigError("data.prompt_column and data.answer_column go together: set both or neither")
        if self.prompt_column is not None and self.verbalizers is not None:
            raise ConfigError("data.verbalizers apply to labelled data; unset them for data.answer_column data")
        if self.verbalizers is not None and len(set(self.verbalizers)) != len(self.verbalizers):
            raise ConfigError(f"data.verbalizers={self.verbalizers} must be distinct")
        if self.verbalizers is not None and not all(self.verbalizers):
            raise ConfigError("data.verbalizers must be non-empty strings, e.g. [' negative', ' positive']")
        for name in ("max_train_examples", "max_eval_examples", "max_validation_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"data.{name}={value} must be >= 1 or null")
