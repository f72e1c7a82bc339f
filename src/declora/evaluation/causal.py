"""Causal-LM evaluation and generation: verbalizer log-likelihood scoring, answer-token loss, greedy decoding.

A labelled example is classified by the summed log-likelihood of each label's verbalizer tokens given the
prompt (no generation needed); instruction data reports the answer-token loss (perplexity =
``exp(eval_loss)``) and the teacher-forced exact match of the whole answer. The prompts and labels come
from :mod:`declora.data.causal`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from declora.config import ConfigError
from declora.data.causal import IGNORE, template_fields, template_of
from declora.data.loading import TaskData
from declora.model.loading import State, forward_with
from declora.rundir import layout


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
    run_dir: str | Path, prompt: str, max_new_tokens: int = 32, adapter: str = layout.AVERAGE, raw: bool = False
) -> tuple[str, str]:
    """Load the run's base model + ``adapters/<adapter>`` (peft ``PeftModel``) and continue ``prompt`` greedily.

    Unless ``raw``, a template with one field (``Review: {sentence}\\nSentiment:``) gets ``prompt`` in it.

    Returns:
        ``(the text given to the model, the generated continuation)``.
    """
    from peft import PeftModel

    from declora.config import load_config
    from declora.model.loading import load_base, load_tokenizer, select_device

    run_dir = Path(run_dir)
    if not (run_dir / layout.CONFIG).is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no {layout.CONFIG})")
    cfg = load_config(run_dir / layout.CONFIG)
    if cfg.model.task_type != "causal_lm":
        raise ConfigError(f"{run_dir} trained model.task_type={cfg.model.task_type}; generate needs causal_lm")
    path, folder = layout.adapter_dir(run_dir, adapter), run_dir / layout.ADAPTERS
    if not (path / layout.PEFT_CONFIG).is_file():
        have = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []
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
