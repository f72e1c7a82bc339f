"""``declora reproduce EXPERIMENT``: the paper's experiments from one YAML recipe each.

A recipe (``recipes/reproduce/<name>.yaml``) is a list of runs, each a list of ``declora train``
overrides, plus overrides shared by every run and per scale (``cpu``: the offline default models and
the shared data, sized for 2 CPU cores; ``paper``: the paper's models and GLUE from the hub). Every
run is exactly the ``declora train`` command that ``--dry-run`` prints, started as a subprocess (so
``--jobs`` can run several at once); runs that already finished are reused, so an interrupted
experiment continues where it stopped. The experiment writes ``results.md`` (a table shaped like the
paper's with the paper's numbers beside ours, the claim checks, the commands), ``results.csv`` and
``compare.png`` under ``OUT/<name>/``.

Example:
    $ declora reproduce --list
    $ declora reproduce label_skew --scale cpu --out reproduce
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from declora.config import ConfigError
from declora.rundir.layout import CONFIG, DONE
from declora.rundir.protect import holds_run

COMPARE_PLOT = "compare.png"  # OUT/<experiment>/: the experiment's runs overlaid (not a run file)

SCALES = ("cpu", "paper")
CHECKS = ("within", "at_least", "order")


def default_recipes_dir() -> Path:
    """``recipes/reproduce`` of this checkout (editable install), else the copy inside the installed
    package (a wheel: ``declora/recipes``, see pyproject's package-data), else of the working directory."""
    here = Path(__file__).resolve().parents[3] / "recipes" / "reproduce"  # <repo>/src/declora/experiments/
    packaged = Path(__file__).resolve().parents[1] / "recipes" / "reproduce"  # <site>/declora/experiments/
    return next((p for p in (here, packaged) if p.is_dir()), Path("recipes/reproduce"))


@dataclass
class RunSpec:
    """One row of an experiment: a name, its overrides, and the paper's number for it (if any)."""

    name: str
    overrides: list[str]
    scales: dict[str, list[str]] = field(default_factory=dict)
    paper: Any = None
    group: str | None = None  # a recipe with ``seeds:``: the run's name without its seed

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in self.name)


@dataclass
class Experiment:
    """A parsed recipe; see ``recipes/reproduce/*.yaml`` for the keys (each is commented there)."""

    name: str
    title: str
    claim: str
    common: list[str]
    scales: dict[str, list[str]]
    runs: list[RunSpec]
    columns: list[str]
    checks: list[dict[str, Any]]
    paper_metric: str = "best_accuracy"
    notes: str = ""
    seeds: list[int] = field(default_factory=list)  # each run once per seed, reported as mean ± std

    def overrides(self, run: RunSpec, scale: str) -> list[str]:
        """Shared, then per-scale, then the run's own, then the run's per-scale overrides (later wins)."""
        return [*self.common, *self.scales.get(scale, []), *run.overrides, *run.scales.get(scale, [])]

    def command(self, run: RunSpec, scale: str, out: Path) -> list[str]:
        return ["declora", "train", *self.overrides(run, scale), f"out_dir={out / self.name / run.slug}"]


def load_experiment(path: Path) -> Experiment:
    """Parse and validate one recipe.

    Raises:
        ConfigError: a missing or malformed key, named with the file.
    """
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict) or not raw.get("runs"):
        raise ConfigError(f"{path}: a recipe needs a `runs:` list")
    runs = []
    for i, r in enumerate(raw["runs"]):
        if "name" not in r:
            raise ConfigError(f"{path}: runs[{i}] has no `name:`")
        runs.append(RunSpec(r["name"], list(r.get("overrides") or []), dict(r.get("scales") or {}), r.get("paper")))
    seeds = [int(s) for s in raw.get("seeds") or []]
    if seeds:  # declora.experiments.seeds: one run per (run, seed)
        from declora.experiments.seeds import seed_name

        runs = [
            RunSpec(seed_name(r.name, s), [*r.overrides, f"train.seed={s}"], r.scales, r.paper, group=r.name)
            for r in runs
            for s in seeds
        ]
    if len({r.slug for r in runs}) != len(runs):
        raise ConfigError(f"{path}: two runs have the same name; give each run its own `name:`")
    checks = list(raw.get("checks") or [])
    for c in checks:
        if c.get("kind") not in CHECKS:
            raise ConfigError(f"{path}: check kind {c.get('kind')!r}; use one of {', '.join(CHECKS)}")
    return Experiment(
        name=raw.get("name", path.stem),
        title=raw.get("title", path.stem),
        claim=raw.get("claim", ""),
        common=list(raw.get("common") or []),
        scales={k: list(v or []) for k, v in (raw.get("scales") or {}).items()},
        runs=runs,
        columns=list(raw.get("columns") or ["best_accuracy", "final_accuracy", "total_bytes_sent"]),
        checks=checks,
        paper_metric=raw.get("paper_metric", "best_accuracy"),
        notes=raw.get("notes", ""),
        seeds=seeds,
    )


def list_experiments(recipes_dir: Path | None = None) -> list[Experiment]:
    recipes_dir = recipes_dir or default_recipes_dir()
    return [load_experiment(p) for p in sorted(Path(recipes_dir).glob("*.yaml"))]


def find_experiment(name: str, recipes_dir: Path | None = None) -> Experiment:
    """The recipe called ``name``; a ConfigError lists the known ones."""
    experiments = {e.name: e for e in list_experiments(recipes_dir)}
    if name not in experiments:
        known = ", ".join(experiments) or f"none in {recipes_dir or default_recipes_dir()}"
        raise ConfigError(f"no experiment {name!r}; `declora reproduce --list` shows them: {known}")
    return experiments[name]


def validate(exp: Experiment, scale: str, out: Path) -> None:
    """Load every run's config (no model, no data) so a bad override stops before anything trains."""
    from declora.config import load_config

    for run in exp.runs:
        try:
            load_config(overrides=exp.overrides(run, scale))
        except ConfigError as err:
            raise ConfigError(f"{exp.name} / {run.name}: {err}") from None


def _config_key(cfg: Any) -> str:
    """A run's resolved config without where it writes and how it shows progress."""
    import json

    d = OmegaConf.to_container(OmegaConf.structured(cfg))
    for key in ("out_dir", "progress", "resume"):
        d.pop(key, None)  # type: ignore[union-attr]
    return json.dumps(d, sort_keys=True)


def finished_twin(exp: Experiment, run: RunSpec, scale: str, out: Path) -> Path | None:
    """A finished run anywhere under ``out`` with exactly this run's config (experiments share rows)."""
    from declora.config import load_config

    key = _config_key(load_config(overrides=exp.overrides(run, scale)))
    for done in sorted(out.glob(f"*/*/{DONE}")):
        try:
            if _config_key(load_config(done.parent / CONFIG)) == key:
                return done.parent
        except ConfigError:
            continue
    return None


def _launch(cmd: list[str], log: Path, threads: int | None) -> subprocess.Popen:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "declora", *cmd[1:], "progress=false"]
    return subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def check_run_options(scale: str, jobs: int) -> None:
    """Stop on a ``--scale`` that is none of :data:`SCALES`, or ``--jobs`` below 1 (no run could ever start)."""
    if scale not in SCALES:
        raise ConfigError(f"--scale {scale}: use one of {', '.join(SCALES)}")
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: give the number of runs at once, 1 or more")


def select_runs(exp: Experiment, only: list[str] | None) -> list[RunSpec]:
    """The runs of ``exp`` that ``--only`` names (by name, folder name or group); all of them without it."""
    return [r for r in exp.runs if not only or r.name in only or r.slug in only or r.group in only]


def check_only(exps: list[Experiment], only: list[str] | None) -> None:
    """Stop on an ``--only`` name that is no run of ``exps`` (it would silently run nothing)."""
    known = {key for e in exps for r in e.runs for key in (r.name, r.slug, r.group) if key}
    unknown = [name for name in only or [] if name not in known]
    if unknown:
        names = ", ".join(repr(r.name) for e in exps for r in e.runs)
        raise ConfigError(f"--only {unknown[0]!r}: no run is called that; the runs: {names}")


def run_experiment(
    exp: Experiment, scale: str, out: Path, *, jobs: int = 1, only: list[str] | None = None, force: bool = False
) -> Path:
    """Run every (selected) run not yet finished, then write the experiment's report.

    Returns:
        The path of ``results.md``.
    """
    check_run_options(scale, jobs)
    validate(exp, scale, out)
    todo = [r for r in select_runs(exp, only) if force or not (out / exp.name / r.slug / DONE).is_file()]
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    running: list[tuple[RunSpec, subprocess.Popen, float]] = []
    failed: list[str] = []
    while todo or running:
        while todo and len(running) < jobs:
            run = todo.pop(0)
            twin = None if force else finished_twin(exp, run, scale, out)
            if twin is not None:  # the same config already ran (e.g. the fp32 row of another experiment)
                shutil.copytree(twin, out / exp.name / run.slug, dirs_exist_ok=True)
                print(f"[{exp.name}] reused {twin} for {run.name} (same config)", flush=True)
                continue
            cmd = exp.command(run, scale, out)
            if holds_run(out / exp.name / run.slug):  # --force, or an unfinished run: start it over
                cmd.append("overwrite=true")
            print(f"[{exp.name}] start {run.name}: {shlex.join(cmd)}", flush=True)
            running.append((run, _launch(cmd, out / exp.name / "logs" / f"{run.slug}.log", threads), time.time()))
        time.sleep(0.5)
        for item in list(running):
            run, proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see logs/{run.slug}.log)"
            print(f"[{exp.name}] {status}: {run.name} in {time.time() - t0:.0f} s", flush=True)
            if proc.returncode != 0:
                failed.append(run.name)
    report = write_report(exp, scale, out)
    if failed:
        raise ConfigError(f"{exp.name}: runs failed: {', '.join(failed)}; their logs are in {out / exp.name / 'logs'}")
    return report


def write_report(exp: Experiment, scale: str, out: Path) -> Path:
    """``results.md`` (table, claim checks, commands), ``results.csv`` and ``compare.png`` from finished runs."""
    from declora.experiments import seeds
    from declora.experiments.compare import plot_compare, read_run, write_csv
    from declora.experiments.report import check_lines, table

    root = out / exp.name
    done = [(r, root / r.slug) for r in exp.runs if (root / r.slug / DONE).is_file()]
    records = {r.name: read_run(path) for r, path in done}
    lines = [f"## {exp.name}: {exp.title}", ""]
    if exp.claim:
        lines += [f"**Paper:** {exp.claim}", ""]
    groups = seeds.group(exp, records) if exp.seeds else {}
    lines += [seeds.seeded_table(exp, groups) if exp.seeds else table(exp, records), ""]
    missing = [r.name for r in exp.runs if r.name not in records]
    if missing:
        lines += [f"Not run yet: {', '.join(missing)}.", ""]
    checks = check_lines(exp, seeds.mean_records(exp, groups) if exp.seeds else records)
    if checks:
        lines += ["**Checks** (computed from the table):", "", *[f"- {c}" for c in checks], ""]
    if exp.notes:
        lines += [exp.notes.strip(), ""]
    lines += [f"Commands (`declora reproduce {exp.name} --scale {scale} --out {out}` runs them all):", "", "```"]
    lines += [shlex.join(exp.command(r, scale, out)) for r in exp.runs]
    lines += ["```", ""]
    if records:
        runs = list(records.values())
        write_csv(runs, root / "results.csv")
        if exp.seeds:
            seeds.plot_seeded(groups, root / COMPARE_PLOT)
        else:
            plot_compare(runs, root / COMPARE_PLOT)
        lines += [f"![{exp.name}]({COMPARE_PLOT})", ""]
    root.mkdir(parents=True, exist_ok=True)
    path = root / "results.md"
    path.write_text("\n".join(lines))
    return path
