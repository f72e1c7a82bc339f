"""Causal-LM task data: prompt templates and answer-only labels (scoring and generation: ``causal_eval``).

A labelled example becomes ``prompt = data.template.format(**row)`` and ``answer = verbalizers[label]``;
an instruction example (``data.prompt_column``/``data.answer_column``) takes its answer from the data.
Both are tokenized once into ``input_ids = prompt + answer + eos`` and ``lm_labels = -100 * len(prompt)
+ answer + eos``, so the model's own shifted cross-entropy covers **only the answer tokens** and the
trainer, clients and gossip run unchanged (``collate`` -> ``forward_with`` -> ``.loss``).

Evaluation needs no generation: a labelled example is classified by the summed log-likelihood of each
label's verbalizer tokens given the prompt; instruction data reports the answer-token loss (perplexity =
``exp(eval_loss)``) and the teacher-forced exact match of the whole answer.
"""

from __future__ import annotations

import string
from typing import Any

import numpy as np

from declora.config import ConfigError, DataConfig
from declora.data.loading import tokenize_in_chunks
from declora.data.sources import label_ids, read_splits, subsample
from declora.data.tasks import TASKS, TaskData, TokenizedSplit

IGNORE = -100  # the label torch's cross-entropy (and transformers' LM loss) skips

# Default prompt and one single-token answer word per label (SmolLM2/LLaMA tokenizers: one token each;
# AG News "Sci/Tech" is answered " Technology").
DEFAULT_PROMPTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sst2": ("Review: {sentence}\nSentiment:", (" negative", " positive")),
    "agnews": ("Article: {text}\nTopic:", (" World", " Sports", " Business", " Technology")),
}
INSTRUCTION_LABELS = ["all"]  # instruction data has no classes: one pseudo-class for the partitioners


def template_of(cfg: DataConfig) -> str:
    """``data.template``, else the task's default, else the prompt column alone followed by a newline."""
    if cfg.template is not None:
        return cfg.template
    if cfg.prompt_column is not None:
        return "{" + cfg.prompt_column + "}\n"
    if cfg.task in DEFAULT_PROMPTS:
        return DEFAULT_PROMPTS[cfg.task][0]
    text = cfg.text_column or "text"
    return "{" + text + "}\nAnswer:"


def template_fields(template: str) -> list[str]:
    """The ``{column}`` names a template reads, in order."""
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ConfigError(f"data.template={template!r}: {err} (write a literal brace as {{{{ or }}}})") from None


def encode(
    tokenizer: Any, prompts: list[str], answers: list[str], max_length: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Tokenize prompt and answer separately and join them; the labels mask the prompt.

    The answer is followed by eos. Examples longer than ``max_length`` lose the start of their prompt
    (after a leading bos), never the answer or the end of the template (the cue before the answer).

    Returns:
        ``(input_ids, lm_labels)``: per example, ``len(prompt) + len(answer) + 1`` ids, and the same
        ids with ``-100`` on every prompt token.
    """
    prompt_ids = tokenize_in_chunks(tokenizer, prompts, add_special_tokens=True)["input_ids"]
    answer_ids = tokenize_in_chunks(tokenizer, answers, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bos = tokenizer.bos_token_id
    ids, labels = [], []
    for p, a in zip(prompt_ids, answer_ids, strict=True):
        a = (a + eos)[: max_length - 1]
        room = max_length - len(a)
        if len(p) > room:
            keep_bos = bos is not None and p[0] == bos
            p = ([bos] if keep_bos else []) + p[len(p) - room + keep_bos :]
        ids.append(p + a)
        labels.append([IGNORE] * len(p) + a)
    return ids, labels


def _read(
    cfg: DataConfig, columns: dict[str, str], seed: int, given: dict[str, Any] | None = None
) -> tuple[dict[str, Any], str]:
    """Both splits (subsampled like data.load_task) and their source; every named column must exist."""
    raw, source = read_splits(cfg, given)
    for part, ds in raw.items():
        for option, col in columns.items():
            if col not in ds.column_names:
                raise ConfigError(f"{option}: {col!r} is not a column of the {part} split {ds.column_names}")
    raw["train"] = subsample(raw["train"], cfg.max_train_examples, seed)
    raw["eval"] = subsample(raw["eval"], cfg.max_eval_examples, seed + 1)
    return raw, source


def load_causal_task(
    cfg: DataConfig, tokenizer: Any, max_length: int, seed: int = 0, given: dict[str, Any] | None = None
) -> TaskData:
    """Load both splits (or the in-memory ``given`` ones, see :func:`declora.data.loading.read_splits`) and
    tokenize them as prompt + answer with answer-only labels.

    Labelled data (sst2, agnews, generic with ``data.label_column``) is scored by its verbalizers;
    instruction data (``data.prompt_column`` + ``data.answer_column``) by its answer tokens.

    Raises:
        ConfigError: missing columns or template fields, verbalizers that do not match the labels.
    """
    spec = TASKS.get(cfg.task)
    template = template_of(cfg)
    fields = template_fields(template)
    columns = {f"data.template field {{{f}}}": f for f in fields}
    if cfg.answer_column is not None:
        columns["data.answer_column"] = cfg.answer_column
        raw, source = _read(cfg, columns, seed, given)
        split = {
            part: _instruction_split(ds, template, cfg.answer_column, tokenizer, max_length) for part, ds in raw.items()
        }
        return TaskData(
            split["train"], split["eval"], list(INSTRUCTION_LABELS), tokenizer.pad_token_id, source, "answer_tokens"
        )
    label_col = cfg.label_column or (spec.label_column if spec else None)
    if label_col is None:
        raise ConfigError(
            "data.task=generic with model.task_type=causal_lm needs data.label_column or data.answer_column"
        )
    columns["data.label_column"] = label_col
    raw, source = _read(cfg, columns, seed, given)
    if spec is not None:
        names = list(spec.label_names)
    else:
        values = raw["train"][label_col]
        names = (
            sorted({str(v) for v in values}) if isinstance(values[0], str) else [str(i) for i in range(max(values) + 1)]
        )
    default = DEFAULT_PROMPTS[cfg.task][1] if cfg.task in DEFAULT_PROMPTS else tuple(f" {n}" for n in names)
    verbalizers = list(cfg.verbalizers or default)
    if len(verbalizers) != len(names):
        raise ConfigError(f"data.verbalizers has {len(verbalizers)} entries for {len(names)} labels {names}")
    verbalizer_ids = tokenizer(verbalizers, add_special_tokens=False)["input_ids"]
    if any(not v for v in verbalizer_ids) or len({tuple(v) for v in verbalizer_ids}) != len(names):
        raise ConfigError(f"data.verbalizers={verbalizers}: each must tokenize to distinct, non-empty tokens")

    def tokenize(ds: Any, part: str) -> TokenizedSplit:
        labels = label_ids(ds[label_col], names, f"{part} split of {source}")
        prompts = [_fill(template, row) for row in ds]
        ids, lm = encode(tokenizer, prompts, [verbalizers[k] for k in labels], max_length)
        return TokenizedSplit(ids, None, labels, lm)

    return TaskData(
        tokenize(raw["train"], "train"),
        tokenize(raw["eval"], "eval"),
        names,
        tokenizer.pad_token_id,
        source,
        "verbalizer",
        verbalizer_ids,
    )


def _fill(template: str, row: dict[str, Any]) -> str:
    return template.format(**{k: "" if v is None else v for k, v in row.items()})


def _instruction_split(ds: Any, template: str, answer_col: str, tokenizer: Any, max_length: int) -> TokenizedSplit:
    prompts = [_fill(template, row) for row in ds]
    ids, lm = encode(tokenizer, prompts, [str(a) for a in ds[answer_col]], max_length)
    return TokenizedSplit(ids, None, np.zeros(len(ids), dtype=np.int64), lm)
