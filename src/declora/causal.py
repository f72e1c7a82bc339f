"""Causal-LM tasks: prompt templates, answer-only labels, verbalizer scoring and generation.

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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from declora.config import ConfigError, DataConfig
from declora.data import TASKS, TaskData, TokenizedSplit, _labels, _subsample, read_splits
from declora.models import State, forward_with

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
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
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


def _read(cfg: DataConfig, columns: dict[str, str], seed: int) -> tuple[dict[str, Any], str]:
    """Both splits (subsampled like data.load_task) and their source; every named column must exist."""
    raw, source = read_splits(cfg)
    for part, ds in raw.items():
        for option, col in columns.items():
            if col not in ds.column_names:
                raise ConfigError(f"{option}: {col!r} is not a column of the {part} split {ds.column_names}")
    raw["train"] = _subsample(raw["train"], cfg.max_train_examples, seed)
    raw["eval"] = _subsample(raw["eval"], cfg.max_eval_examples, seed + 1)
    return raw, source


def load_causal_task(cfg: DataConfig, tokenizer: Any, max_length: int, seed: int = 0) -> TaskData:
    """Load both splits and tokenize them as prompt + answer with answer-only labels.

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
        raw, source = _read(cfg, columns, seed)
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
    raw, source = _read(cfg, columns, seed)
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
        labels = _labels(ds[label_col], names, f"{part} split of {source}")
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


@torch.no_grad()
def answer_logprobs(
    model: nn.Module,
    state: State,
    rows: list[list[int]],
    targets: list[list[int]],
    pad_token_id: int,
    device: torch.device,
    candidates: list[int] | None = None,
    micro_batch: int = 16,
) -> dict[str, np.ndarray]:
    """Log-likelihood of each row's answer tokens (``targets != -100``) under ``model`` with ``state``.

    Rows run ``micro_batch`` at a time, bounding the (batch, seq, vocab) logits.

    Returns:
        ``logp`` (n,) summed log-probabilities of the answer tokens, ``tokens`` (n,) their count,
        ``exact`` (n,) whether every answer token is the argmax, and with ``candidates`` (K token ids)
        ``first`` (n, K): the log-probability of each candidate at the first answer position.
    """
    out: dict[str, list[Any]] = {"logp": [], "tokens": [], "exact": [], "first": []}
    for start in range(0, len(rows), micro_batch):
        chunk = rows[start : start + micro_batch]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        tgt = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for k, (r, t) in enumerate(zip(chunk, targets[start : start + micro_batch], strict=True)):
            ids[k, : len(r)], tgt[k, : len(t)], mask[k, : len(r)] = torch.tensor(r), torch.tensor(t), 1
        logits = forward_with(model, state, {"input_ids": ids.to(device), "attention_mask": mask.to(device)}).logits
        logp = logits[:, :-1].float().log_softmax(-1)  # position i predicts token i + 1
        nxt = tgt[:, 1:].to(device)
        on = nxt != IGNORE
        tok = logp.gather(-1, nxt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out["logp"].append((tok * on).sum(1).cpu())
        out["tokens"].append(on.sum(1).cpu())
        out["exact"].append(((logp.argmax(-1) == nxt) | ~on).all(1).cpu())
        if candidates is not None:
            first = on.float().argmax(1)  # the last prompt position
            out["first"].append(logp[torch.arange(len(chunk)), first][:, candidates].cpu())
    result = {k: torch.cat(v).numpy() for k, v in out.items() if v}
    return result


def score_verbalizers(
    model: nn.Module, state: State, data: TaskData, chunk: np.ndarray, device: torch.device
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Classify by the summed log-likelihood of each label's verbalizer tokens after the prompt.

    Returns:
        ``(predictions (n,), correct (n,), answer-token NLL summed, answer tokens)``; the loss is on
        the gold answer (verbalizer + eos), the tokens training sees.
    """
    split, verbs = data.eval, data.verbalizer_ids
    assert verbs is not None, "scoring=verbalizer needs TaskData.verbalizer_ids"
    rows = [split.input_ids[i] for i in chunk]
    targets = [split.lm_labels[i] for i in chunk]  # type: ignore[index]
    single = all(len(v) == 1 for v in verbs)
    gold = answer_logprobs(
        model, state, rows, targets, data.pad_token_id, device, [v[0] for v in verbs] if single else None
    )
    if single:  # one forward pass gives every label's score
        scores = gold["first"]
    else:  # one pass per label over prompt + verbalizer
        prompts = [r[: next(j for j, t in enumerate(tg) if t != IGNORE)] for r, tg in zip(rows, targets, strict=True)]
        scores = np.stack(
            [
                answer_logprobs(
                    model,
                    state,
                    [p + v for p in prompts],
                    [[IGNORE] * len(p) + v for p in prompts],
                    data.pad_token_id,
                    device,
                )["logp"]
                for v in verbs
            ],
            axis=1,
        )
    preds = scores.argmax(1)
    return preds, preds == split.labels[chunk], float(-gold["logp"].sum()), float(gold["tokens"].sum())


def score_answer_tokens(
    model: nn.Module, state: State, data: TaskData, chunk: np.ndarray, device: torch.device
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Instruction data: answer-token NLL and teacher-forced exact match (every answer token the argmax).

    Returns:
        ``(exact (n,) as 0/1, exact (n,), answer-token NLL summed, answer tokens)``.
    """
    rows = [data.eval.input_ids[i] for i in chunk]
    res = answer_logprobs(model, state, rows, [data.eval.lm_labels[i] for i in chunk], data.pad_token_id, device)  # type: ignore[index]
    return res["exact"].astype(np.int64), res["exact"], float(-res["logp"].sum()), float(res["tokens"].sum())


def generate_from_run(
    run_dir: str | Path, prompt: str, max_new_tokens: int = 32, adapter: str = "average", raw: bool = False
) -> tuple[str, str]:
    """Load the run's base model + ``adapters/<adapter>`` (peft ``PeftModel``) and continue ``prompt`` greedily.

    Unless ``raw``, a template with one field (``Review: {sentence}\\nSentiment:``) gets ``prompt`` in it.

    Returns:
        ``(the text given to the model, the generated continuation)``.
    """
    from peft import PeftModel

    from declora.config import load_config
    from declora.models import load_base, load_tokenizer, select_device

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    if cfg.model.task_type != "causal_lm":
        raise ConfigError(f"{run_dir} trained model.task_type={cfg.model.task_type}; generate needs causal_lm")
    path = run_dir / "adapters" / adapter
    if not (path / "adapter_config.json").is_file():
        have = sorted(p.name for p in (run_dir / "adapters").glob("*")) if (run_dir / "adapters").is_dir() else []
        raise ConfigError(
            f"--adapter {adapter}: no adapters/{adapter} in {run_dir} (have: {', '.join(have) or 'none'})"
        )
    tokenizer = load_tokenizer(cfg.model)
    model = PeftModel.from_pretrained(load_base(cfg.model, 2), str(path)).to(select_device(cfg.model.device)).eval()
    template = template_of(cfg.data)
    fields = template_fields(template)
    text = prompt if raw or len(set(fields)) != 1 else template.format(**{fields[0]: prompt})
    enc = tokenizer(text, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return text, tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
