"""Use a finished run: evaluate a saved adapter, predict labels, export a (merged) model.

Everything is rebuilt from the run directory: ``config.yaml`` gives the base model (resolved by declora,
so embedded aliases work offline), the PEFT wrapping and the data options; ``summary.json`` (or the
adapter's ``declora.json``) the label names; ``adapters/<name>/`` the trained tensors. Evaluation goes
through the trainer's own :func:`declora.evaluation.evaluate.evaluate` on a split loaded as the run loaded its
held-out split (:func:`declora.data.validation.load_split`), so ``declora eval RUN`` reproduces the run's
reported accuracy exactly.

Example:
    >>> evaluate_run("runs/x")["accuracy"]            # doctest: +SKIP
    >>> predict(load_run("runs/x"), ["a gorgeous film"])  # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from declora.config import Config, ConfigError
from declora.model.loading import State
from declora.rundir import layout
from declora.rundir.layout import AVERAGE

_ADAPTER_FILES = (layout.PEFT_WEIGHTS, layout.HEAD_WEIGHTS)


@dataclass
class LoadedRun:
    """A run's model with one of its adapters, ready to score text."""

    path: Path
    cfg: Config
    adapter: str
    model: nn.Module  # the PEFT-wrapped base, frozen
    state: State  # the adapter's trained tensors (swapped in by forward_with)
    tokenizer: Any
    label_names: list[str]
    device: torch.device


def adapter_dir(run: Path, name: str) -> Path:
    """``run/adapters/<name>``; ConfigError listing the adapters there when it has none of that name."""
    path = layout.adapter_dir(run, name)
    if not any((path / f).is_file() for f in _ADAPTER_FILES):
        folder = Path(run) / layout.ADAPTERS
        have = sorted(p.name for p in folder.glob("[!.]*")) if folder.is_dir() else []
        raise ConfigError(f"--adapter {name}: no adapters/{name} in {run} (have: {', '.join(have) or 'none'})")
    return path


def run_label_names(run: Path, adapter: Path) -> list[str]:
    """The run's label names: summary.json, else the adapter's declora.json (an unfinished run's best)."""
    for file, key in ((Path(run) / layout.SUMMARY, "label_names"), (adapter / layout.ADAPTER_METADATA, "id2label")):
        if file.is_file():
            value = json.loads(file.read_text()).get(key)
            if value:
                return list(value) if isinstance(value, list) else [value[str(i)] for i in range(len(value))]
    raise ConfigError(f"{run}: no summary.json or adapters/*/declora.json naming the labels")


def read_adapter_state(model: nn.Module, path: Path) -> State:
    """Load ``path``'s saved tensors into ``model`` (peft's own key mapping) and return them as a state."""
    from safetensors.torch import load_file

    from declora.model.loading import load_state, trainable_state

    if (path / layout.PEFT_WEIGHTS).is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(path / layout.PEFT_WEIGHTS)))
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if k]
        if unexpected:
            raise ConfigError(f"{path}: tensors {unexpected[:3]} do not fit the run's model")
        return trainable_state(model)
    head = load_file(str(path / layout.HEAD_WEIGHTS))  # peft.method=head_only
    load_state(model, head)
    return {n: t.float() for n, t in head.items()}


def adapter_peft(peft_cfg: Any, path: Path) -> Any:
    """The run's ``peft`` section at the saved LoRA adapter's own ``r`` and ``lora_alpha``.

    dec_decaf's and peft.ranks' ``average``/``best`` hold the exact mean update at a rank k other than
    ``peft.r`` (:func:`declora.rundir.adapters.widen_adapter`), and a peft.ranks peer its own r_i.
    """
    file = path / layout.PEFT_CONFIG
    if peft_cfg.method != "lora" or not file.is_file():
        return peft_cfg
    saved = json.loads(file.read_text())
    if saved.get("r") == peft_cfg.r and peft_cfg.ranks is None:
        return peft_cfg
    return replace(peft_cfg, r=int(saved["r"]), lora_alpha=float(saved["lora_alpha"]), ranks=None)


def load_run(run_dir: str | Path, adapter: str = AVERAGE) -> LoadedRun:
    """Rebuild the run's model and load ``adapters/<adapter>`` (average, best or client_<i>).

    Raises:
        ConfigError: not a run directory, no such adapter, or tensors that do not fit.
    """
    from declora.config import load_config
    from declora.model.loading import build_model, load_tokenizer

    run = Path(run_dir)
    if not (run / layout.CONFIG).is_file():
        raise ConfigError(f"{run}: not a run directory (no {layout.CONFIG})")
    cfg = load_config(run / layout.CONFIG)
    path = adapter_dir(run, adapter)
    names = run_label_names(run, path)
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg.model, adapter_peft(cfg.peft, path), len(names), seed=cfg.train.seed)
    state = read_adapter_state(model, path)
    model.requires_grad_(False)
    return LoadedRun(run, cfg, adapter, model, state, tokenizer, names, next(model.parameters()).device)


def _split_and_cap(cfg: Config, split: str | None, data_path: str | None, cap: int | None) -> tuple[str, int | None]:
    """The split to read and its subset size: the run's own (and its cap) unless told otherwise."""
    from declora.data.loading import TASKS, find_data_dir
    from declora.data.validation import validation_split_name

    same_data = data_path is None
    if split == "validation" and same_data and cfg.data.validation_split != "none":
        name = validation_split_name(cfg)
        if name is not None:
            return name, cap if cap is not None else cfg.data.max_validation_examples
    spec = TASKS.get(cfg.data.task)
    local = find_data_dir(cfg.data) is not None
    held_out = cfg.data.eval_split or (
        (spec.local_eval_split if local else spec.hub_eval_split) if spec is not None else "test"
    )
    name = split or held_out
    if cap is None and same_data and name == held_out:
        cap = cfg.data.max_eval_examples  # the run's own subset of its held-out split
    return name, cap


def evaluate_run(
    run_dir: str | Path,
    adapter: str = AVERAGE,
    split: str | None = None,
    data_path: str | None = None,
    max_examples: int | None = None,
    batch_size: int | None = None,
    loaded: LoadedRun | None = None,
) -> dict[str, Any]:
    """Accuracy and loss of ``adapters/<adapter>`` on a split of the run's data or of ``data_path``.

    Args:
        split: a split (file stem or hub split); ``validation`` = the run's validation split; None =
            the run's held-out split, with the run's ``data.max_eval_examples`` subset.
        data_path: another folder with files in the run's columns (``data.path``).
        max_examples: a seeded subset (as ``data.max_eval_examples``); None = the run's cap or all.
    """
    from declora.data.validation import load_split, read_split
    from declora.evaluation.evaluate import evaluate, length_sorted

    for name, value in (("max_examples", max_examples), ("batch_size", batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{name}={value} must be >= 1 (None: the run's own)")
    lr = loaded or load_run(run_dir, adapter)
    cfg = lr.cfg if data_path is None else replace(lr.cfg, data=replace(lr.cfg.data, path=str(data_path)))
    name, cap = _split_and_cap(cfg, split, data_path, max_examples)
    raw, source = read_split(cfg, name)
    data = load_split(cfg, raw, source, lr.tokenizer, lr.label_names, cap)
    result = evaluate(lr.model, lr.state, data, length_sorted(data), lr.device, batch_size or cfg.eval.batch_size)
    return {
        "adapter": lr.adapter,
        "split": name,
        "source": source,
        "examples": len(data.eval),
        "accuracy": result.accuracy,
        "loss": result.loss,
    }


def _text_dataset(lr: LoadedRun, texts: list[str]) -> Any:
    """``texts`` as a raw split in the run's columns (a placeholder label, never scored)."""
    import datasets

    from declora.data.loading import TASKS

    spec = TASKS.get(lr.cfg.data.task)
    d = lr.cfg.data
    if d.answer_column is not None or d.text_pair_column is not None:
        raise ConfigError("predict takes single texts of labelled data; this run uses pairs or prompt/answer data")
    text_col = d.text_column or (spec.text_column if spec else None)
    label_col = d.label_column or (spec.label_column if spec else None)
    if lr.cfg.model.task_type == "causal_lm":
        from declora.data.causal import template_fields, template_of

        fields = sorted(set(template_fields(template_of(d))))
        if len(fields) != 1:
            raise ConfigError(f"predict fills one template field; data.template has {fields}")
        text_col = fields[0]
    return datasets.Dataset.from_dict({text_col: texts, label_col: [0] * len(texts)})


def predict(lr: LoadedRun, texts: list[str], batch_size: int = 64) -> list[dict[str, Any]]:
    """The label of each text (and, for a classifier, the probability of every label)."""
    from declora.data.loading import collate
    from declora.data.validation import load_split
    from declora.evaluation.evaluate import evaluate
    from declora.model.loading import forward_with

    if not texts:
        return []
    data = load_split(lr.cfg, _text_dataset(lr, texts), "texts", lr.tokenizer, lr.label_names, None)
    order = np.arange(len(texts))
    if data.scoring != "classifier":  # causal_lm: the label whose verbalizer is most likely
        preds = evaluate(lr.model, lr.state, data, order, lr.device, batch_size).predictions
        return [{"text": t, "label": lr.label_names[int(p)]} for t, p in zip(texts, preds, strict=True)]
    out = []
    lr.model.eval()
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            chunk = order[start : start + batch_size]
            logits = forward_with(lr.model, lr.state, collate(data.eval, chunk, data.pad_token_id, lr.device)).logits
            for i, p in zip(chunk, torch.softmax(logits.float(), -1).cpu().numpy(), strict=True):
                probs = {n: float(v) for n, v in zip(lr.label_names, p, strict=True)}
                out.append({"text": texts[i], "label": lr.label_names[int(p.argmax())], "probabilities": probs})
    return out


def read_texts(file: str | Path, lr: LoadedRun) -> list[str]:
    """Texts of ``file``: a .tsv/.csv/.jsonl/.parquet in the run's columns, else one text per line."""
    file = Path(file)
    if not file.is_file():
        raise ConfigError(f"--file {file}: no such file")
    if file.suffix in (".tsv", ".csv", ".jsonl", ".json", ".parquet"):
        from declora.data.sources import load_local

        ds = load_local(file.parent, file.stem)
        column = next(iter(_text_dataset(lr, [""]).column_names))
        if column not in ds.column_names:
            raise ConfigError(f"--file {file}: no column {column!r} (has {ds.column_names})")
        return [str(t) if t is not None else "" for t in ds[column]]
    return [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def export(run_dir: str | Path, out: str | Path, adapter: str = AVERAGE, merge: bool = False) -> Path:
    """Write ``adapters/<adapter>`` to ``out``: the adapter folder (+ tokenizer), or with ``merge`` a full
    transformers model (LoRA merged into the base, labels in its config) that loads with
    ``AutoModelForSequenceClassification/AutoModelForCausalLM.from_pretrained(out)``.

    Raises:
        ConfigError: ``out`` exists and is not empty, or cannot be written (checked before the model loads).
    """
    from declora.rundir.protect import check_writable

    out = Path(out)
    if out.exists() and out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"export: {out} exists and is not empty; give a new folder")
    check_writable(out, "export OUT")  # proven before the model loads and merges
    lr = load_run(run_dir, adapter)
    source = adapter_dir(lr.path, adapter)
    if not merge:
        shutil.copytree(source, out, dirs_exist_ok=True)
        lr.tokenizer.save_pretrained(str(out))
        return out
    from declora.model.loading import load_state

    load_state(lr.model, lr.state)
    merged = lr.model.merge_and_unload() if hasattr(lr.model, "merge_and_unload") else lr.model
    if lr.cfg.model.task_type == "seq_cls":
        merged.config.id2label = dict(enumerate(lr.label_names))
        merged.config.label2id = {n: i for i, n in enumerate(lr.label_names)}
    merged.save_pretrained(str(out))
    lr.tokenizer.save_pretrained(str(out))
    if (source / layout.ADAPTER_METADATA).is_file():  # the facts of the adapter it was merged from
        shutil.copy(source / layout.ADAPTER_METADATA, out / layout.ADAPTER_METADATA)
    card = source / layout.MODEL_CARD
    if card.is_file():
        (out / layout.MODEL_CARD).write_text(_merged_card(card.read_text(), lr.cfg.model.task_type))
    return out


def _merged_card(card: str, task_type: str) -> str:
    """The adapter's model card, made the card of a full model (transformers, no peft needed)."""
    auto = "AutoModelForCausalLM" if task_type == "causal_lm" else "AutoModelForSequenceClassification"
    card = card.replace("library_name: peft", "library_name: transformers").replace(
        "- base_model:adapter:", "- base_model:finetune:"
    )
    head, sep, rest = card.partition("## How to Get Started with the Model")
    _, _, tail = rest.partition("## Training Details")
    usage = (
        "\n\nThe adapter merged into its base model (`declora export --merge`): a plain transformers model.\n\n"
        f"```python\nfrom transformers import {auto}, AutoTokenizer\n\n"
        f'model = {auto}.from_pretrained(".")\ntokenizer = AutoTokenizer.from_pretrained(".")\n```\n\n'
    )
    return head + sep + usage + "## Training Details" + tail if sep else card
