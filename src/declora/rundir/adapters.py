"""What a run leaves in ``adapters/<name>/``: portable, self-describing peft folders.

Each folder holds peft's ``adapter_config.json`` + ``adapter_model.safetensors`` and, written here:

* ``adapter_config.json``'s ``base_model_name_or_path`` is a name that resolves on another machine:
  the hub id of an embedded model whose weights are the hub's (``all-minilm-l6-v2`` ->
  ``sentence-transformers/all-MiniLM-L6-v2``), the alias of one that is not (``smollm2``, a GGUF
  quantization), else ``model.name_or_path`` as configured. The local folder is only a hint, in
  ``declora.json``.
* ``declora.json``: the task, ``num_labels``/``id2label``/``label2id``, the base model (name, package,
  local path hint), the run's settings and accuracy.
* ``README.md``: a model card in peft's format (YAML header, then what was trained and how, the
  results, how to load it).
* ``average`` and ``best`` also get the tokenizer, so they load without the base model's folder.

peft builds the base model from ``base_model_name_or_path`` alone, so a classifier with other than the
base config's labels needs them passed (they are in ``declora.json``), see :func:`loading_snippet`.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from declora.config import Config, ModelConfig
from declora.rundir.files import atomic_write_text, share_files
from declora.rundir.layout import ADAPTER_METADATA as METADATA
from declora.rundir.layout import ADAPTERS, AVERAGE, BEST, MODEL_CARD, PEFT_CONFIG, PEFT_WEIGHTS

# Embedded aliases whose files are exactly a hub repository's.
HUB_IDS = {
    "all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
}
_PIPELINE = {"seq_cls": "text-classification", "causal_lm": "text-generation"}
_AUTO_PEFT = {"seq_cls": "AutoPeftModelForSequenceClassification", "causal_lm": "AutoPeftModelForCausalLM"}


def portable_base_name(model: ModelConfig) -> str:
    """The base model's name as other machines can resolve it (see the module docstring)."""
    return HUB_IDS.get(model.name_or_path, model.name_or_path)


def base_model_info(model: ModelConfig) -> dict[str, Any]:
    """The base model: portable name, declora's name, the PyPI package (and version) of an embedded one."""
    from declora.model.loading import EMBEDDED_MODELS, gguf_file_of, resolve_model_path

    info: dict[str, Any] = {"base_model": portable_base_name(model), "declora_name_or_path": model.name_or_path}
    if model.name_or_path in EMBEDDED_MODELS:
        package = EMBEDDED_MODELS[model.name_or_path][0].replace("_", "-")
        try:
            info |= {"package": package, "package_version": version(package)}
        except PackageNotFoundError:
            info |= {"package": package, "package_version": None}
    try:
        info["local_path_hint"] = resolve_model_path(model.name_or_path, gguf_file_of(model))
    except Exception:  # a missing package: the hint is optional
        info["local_path_hint"] = None
    info["gguf_file"] = gguf_file_of(model)
    return info


def label_maps(label_names: list[str]) -> dict[str, Any]:
    """``num_labels``, ``id2label``, ``label2id`` as transformers' configs hold them."""
    return {
        "num_labels": len(label_names),
        "id2label": {str(i): n for i, n in enumerate(label_names)},
        "label2id": {n: i for i, n in enumerate(label_names)},
    }


def save_best(model: nn.Module, mean: dict[str, torch.Tensor], path: Path, save: Any) -> None:
    """Save the averaged ``mean`` as ``adapters/best`` (or ``average``), leaving the model's tensors as they were.

    A product-mixing average (dec_decaf, peft.ranks: :class:`declora.algorithms.dec_decaf.ProductMean`)
    holds LoRA factors of a rank k other than the model's r; those are written at rank k by
    :func:`widen_adapter`, in a staging folder renamed into place, so a half-written adapter never appears.

    Args:
        save: the trainer's atomic ``save_adapter(model, state, path)``.
    """
    import shutil

    params = dict(model.named_parameters())
    fits = {n: t for n, t in mean.items() if n not in params or params[n].shape == t.shape}
    before = {n: params[n].detach().clone() for n in fits if n in params}
    staging = path if len(fits) == len(mean) else path.with_name(f".{path.name}.wide")
    save(model, fits, staging)
    with torch.no_grad():  # clients never read these (their own tensors are swapped in), but be exact
        for n, t in before.items():
            params[n].copy_(t)
    if staging != path:
        widen_adapter(staging, {n: t for n, t in mean.items() if n not in fits})
        share_files(staging)
        shutil.rmtree(path, ignore_errors=True)
        staging.rename(path)


def widen_adapter(folder: Path, factors: dict[str, torch.Tensor]) -> None:
    """Replace a saved LoRA adapter's factors by rank-k ``factors`` (named as the model's parameters).

    peft scales ``B A`` by ``lora_alpha / r``; the factors were computed in the shared model's scale
    ``alpha / r``, so the folder gets ``r = k`` and ``lora_alpha = alpha * k / r``: plain peft then
    computes exactly the update that was evaluated.

    Raises:
        ValueError: a factor has no tensor in the folder, or the config scales otherwise (rslora, patterns).
    """
    import re

    from safetensors.torch import load_file, save_file

    config = json.loads((folder / PEFT_CONFIG).read_text())
    if config.get("use_rslora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{folder}: cannot widen an adapter with rslora or rank/alpha patterns")
    tensors = load_file(str(folder / PEFT_WEIGHTS))
    ranks = set()
    for name, t in factors.items():
        key = re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", name)  # peft drops the adapter name
        if key not in tensors:
            raise ValueError(f"{folder}: no saved tensor {key} for {name}")
        tensors[key] = t.detach().to(tensors[key].dtype).contiguous().cpu()
        ranks.add(t.shape[0] if ".lora_A." in name else t.shape[1])
    (k,) = ranks
    alpha = config["lora_alpha"] * k / config["r"]
    config |= {"r": k, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha}
    save_file(tensors, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
    (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))


def _facts(cfg: Config, summary: dict[str, Any]) -> list[tuple[str, Any]]:
    t, p = cfg.train, cfg.partition
    partition = p.kind + (f" (alpha={p.alpha})" if p.kind == "dirichlet" else "")
    graph = f"{summary.get('topology')} ({summary.get('mixing')} mixing)" if summary.get("topology") else "none"
    return [
        ("algorithm", t.algorithm),
        ("communication graph", graph),
        ("clients", t.clients),
        ("rounds x local steps", f"{summary.get('rounds', t.rounds)} x {t.local_steps}"),
        ("batch size, learning rate", f"{t.batch_size}, {t.lr} ({t.optimizer})"),
        (
            "PEFT method",
            f"{cfg.peft.method}"
            + (f" (r={cfg.peft.r}, alpha={cfg.peft.lora_alpha})" if cfg.peft.method == "lora" else ""),
        ),
        (
            "data",
            f"{cfg.data.task} from {summary.get('data_source')}, {summary.get('train_examples')} training examples",
        ),
        ("partition", partition),
        ("seed", t.seed),
    ]


def loading_snippet(path: str, task_type: str) -> str:
    """Python that loads the folder with transformers + peft alone (labels passed: see the module doc)."""
    auto = _AUTO_PEFT[task_type]
    kwargs, labels = "", ""
    if task_type == "seq_cls":  # JSON keys are strings; transformers wants int ids when given as arguments
        labels = 'id2label = {int(i): name for i, name in meta["id2label"].items()}\n'
        kwargs = ', num_labels=len(id2label), id2label=id2label, label2id=meta["label2id"]'
    return (
        "import json\n"
        f"from peft import {auto}\n"
        "from transformers import AutoTokenizer\n\n"
        f'path = "{path}"\n'
        f'meta = json.load(open(f"{{path}}/{METADATA}"))\n'
        f"{labels}"
        f"model = {auto}.from_pretrained(path{kwargs})\n"
        'tokenizer = AutoTokenizer.from_pretrained(path)  # or meta["base_model"]\n'
    )


def model_card(name: str, cfg: Config, summary: dict[str, Any], meta: dict[str, Any]) -> str:
    """``README.md`` in peft's model-card layout (YAML header, Model Details, ..., Framework versions)."""
    base = meta["base_model"]["base_model"]
    task = cfg.model.task_type
    header = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        f"pipeline_tag: {_PIPELINE[task]}",
        "tags:",
        f"- base_model:adapter:{base}",
        f"- {cfg.peft.method}",
        "- transformers",
        "- declora",
        f"- {cfg.train.algorithm}",
        "metrics:",
        "- accuracy",
        "---",
    ]
    which = meta["adapter"]
    what = {
        AVERAGE: "the averaged model after the last round: the mean over the member clients of every trained "
        "tensor (dec_decaf and peft.ranks: of every LoRA update B A, exactly)",
        BEST: f"the averaged model after round {meta.get('round')}, the round of highest validation accuracy",
    }.get(which, f"client {which.removeprefix('client_')}'s own adapter after the last round")
    facts = "\n".join(f"- **{k}:** {v}" for k, v in _facts(cfg, summary))
    acc = meta.get("accuracy")
    result = f"{100 * acc:.2f} %" if isinstance(acc, float) else "not measured for this adapter"
    val = summary.get("best_validation_accuracy")
    lines = [
        *header,
        "",
        f"# {name}: {which} adapter of a declora run",
        "",
        "## Model Details",
        "",
        "### Model Description",
        "",
        f"A {cfg.peft.method} adapter of `{base}` for {_PIPELINE[task]} ({cfg.data.task}), trained by "
        f"[declora](https://arxiv.org/abs/2501.15361)-style decentralized fine-tuning: {what}.",
        "",
        f"- **Model type:** {cfg.peft.method} adapter + task head ({task})",
        f"- **Finetuned from model:** {base}"
        + (f" (declora alias `{cfg.model.name_or_path}`)" if base != cfg.model.name_or_path else ""),
        f"- **Labels:** {', '.join(summary.get('label_names') or [])}",
        "",
        "## How to Get Started with the Model",
        "",
        "```python",
        loading_snippet(".", task).rstrip(),
        "```",
        "",
        "Offline, give the base model's local folder (`declora.json` -> `base_model.local_path_hint`) to "
        "`AutoModelFor...from_pretrained(folder, num_labels=..., id2label=..., label2id=...)` and wrap it with "
        "`peft.PeftModel.from_pretrained(base, path)`; or use `declora eval/predict/export RUN_DIR`.",
        "",
        "## Training Details",
        "",
        "### Training Procedure",
        "",
        facts,
        "",
        "## Evaluation",
        "",
        "### Results",
        "",
        f"- **held-out accuracy ({summary.get('eval_examples')} examples of {summary.get('data_source')}):** {result}",
        f"- **best round:** {summary.get('best_round')} (selected on {summary.get('best_round_selected_on', 'test')}"
        + (f", validation accuracy {100 * val:.2f} %)" if isinstance(val, float) else ")"),
        f"- **final averaged-model accuracy:** {100 * summary['final_accuracy']:.2f} %",
        "",
        "### Framework versions",
        "",
        f"- PEFT {_version('peft')}",
        f"- transformers {_version('transformers')}",
        f"- declora {_version('declora')}",
        "",
    ]
    return "\n".join(lines)


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "unknown"


def describe_adapters(
    run: Path, cfg: Config, summary: dict[str, Any], history: list[dict[str, Any]], tokenizer: Any
) -> None:
    """Write ``declora.json`` and ``README.md`` into every ``adapters/*`` folder of ``run`` (+ the tokenizer)."""
    labels = label_maps(summary.get("label_names") or [])
    base = base_model_info(cfg.model)
    rows = {r["round"]: r for r in history}
    for folder in sorted((Path(run) / ADAPTERS).glob("*")):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        name = folder.name
        round_ = summary["best_round"] if name == BEST else summary.get("rounds")
        accuracy = rows.get(round_, {}).get("accuracy") if name in (AVERAGE, BEST) else None
        meta = {
            "adapter": name,
            "round": round_,
            "accuracy": accuracy,
            "task_type": cfg.model.task_type,
            **labels,
            "base_model": base,
            "algorithm": cfg.train.algorithm,
            "clients": cfg.train.clients,
            "peft_method": cfg.peft.method,
            "declora_version": _version("declora"),
            "run": Path(run).name,
        }
        atomic_write_text(folder / METADATA, json.dumps(meta, indent=2) + "\n")
        atomic_write_text(folder / MODEL_CARD, model_card(Path(run).name, cfg, summary, meta))
        config = folder / PEFT_CONFIG
        if config.is_file():  # also adapters saved before this fix: same name for every folder
            peft_cfg = json.loads(config.read_text())
            peft_cfg["base_model_name_or_path"] = base["base_model"]
            atomic_write_text(config, json.dumps(peft_cfg, indent=2, sort_keys=True) + "\n")
        if name in (AVERAGE, BEST) and tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
