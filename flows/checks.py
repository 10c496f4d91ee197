"""What each flow checks before it starts anything: its settings built, its files, corpus and Ray
cluster found. Light (no Prefect, torch, MLflow or pyarrow): a flow runs its check first, and the
command line runs the same check before it imports the flow, so a bad input is refused at once
(``tests/flows/test_cli_refusals.py``)."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptflow.data.finetune_inputs import check_data_file
from gptflow.data.mixture import WeightedCorpus
from gptflow.data.sources import BUILTIN_CORPUS, SourceResolution, resolve_sources
from gptflow.data.url_blocklist import load_url_blocklist
from gptflow.tasks.runtime.gpu_share import GpuShare, share_machine_gpus
from gptflow.tasks.runtime.ray_address import resolve_ray_address
from gptflow.tasks.runtime.rendezvous import Rendezvous, RendezvousError
from gptflow.tasks.settings import ConfigError, EvaluateSettings, FinetuneSettings, PretrainSettings, build_config

if typing.TYPE_CHECKING:  # the sweep's planning is imported by its check alone
    from gptflow.tasks.sweep_plan import SweepPoint


@dataclass(frozen=True)
class PretrainInputs:
    config: PretrainSettings
    corpus: list[str]
    """As given; the built-in corpus when none is."""
    weighted: WeightedCorpus
    sources: SourceResolution
    ray_address: str | None
    eval_sources: SourceResolution | None = None
    """The evaluation corpus's files (``--eval-corpus``); None without one."""


def check_pretrain(corpus: list[str] | None, preset: str, config_file: str | None, overrides: dict[str, Any] | None,
                   ray: str | None, rendezvous: Rendezvous | None, init_from: str | None,
                   eval_corpus: list[str] | None = None) -> PretrainInputs:
    """The pretrain flow's settings, corpus, evaluation corpus and Ray cluster."""
    if init_from is not None and (shaped := sorted(name for name in overrides or {} if name.startswith("model."))):
        raise ConfigError(f"--init-from trains its model as it is: {', '.join(shaped)} cannot be set with it.")
    config = build_config(PretrainSettings, preset, config_file, overrides)
    load_url_blocklist(config.data.url_blocklist)
    if rendezvous is not None and rendezvous.world_size != config.train.nproc:
        raise RendezvousError(f"{rendezvous.nnodes} nodes of {rendezvous.nproc_per_node} processes are "
                              f"{rendezvous.world_size} ranks, but train.nproc is {config.train.nproc}: leave "
                              "train.nproc unset with --nnodes (gptflow sets it to nodes x processes per node).")
    corpus = corpus or [BUILTIN_CORPUS]
    weighted = WeightedCorpus.parse(corpus)
    return PretrainInputs(config, corpus, weighted, resolve_sources(weighted.sources), resolve_ray_address(ray),
                          resolve_sources(eval_corpus) if eval_corpus else None)


@dataclass(frozen=True)
class SweepInputs:
    points: list[SweepPoint]
    configs: list[PretrainSettings]
    """Each point's settings."""
    corpus: list[str]
    """As given; the built-in corpus when none is."""
    ray_address: str | None
    machine_share: GpuShare | None
    """How the worker processes share this machine's GPUs; None on Ray (counted on connecting)."""


def check_sweep(grid: dict[str, list[Any]], corpus: list[str] | None, preset: str, config_file: str | None,
                overrides: dict[str, Any], random_points: int | None, seed: int, scaling: bool,
                max_parallel: int, ray: str | None, eval_corpus: list[str] | None = None) -> SweepInputs:
    """The sweep's points and their settings, its corpus and evaluation corpus (a missing path
    fails the sweep, not every point), its Ray cluster, and the share of this machine's GPUs (last:
    it may import torch)."""
    from gptflow.tasks.sweep_plan import check_points, check_scaling, plan_points

    points = plan_points(grid, random_points, seed)
    configs = check_points(points, preset, config_file, overrides)
    if scaling:
        check_scaling(points, configs)
    for config in configs:
        load_url_blocklist(config.data.url_blocklist)
    corpus = corpus or [BUILTIN_CORPUS]
    resolve_sources(WeightedCorpus.parse(corpus).sources)
    if eval_corpus:
        resolve_sources(eval_corpus)
    ray_address = resolve_ray_address(ray)
    machine_share = share_machine_gpus(max_parallel) if ray_address is None else None
    return SweepInputs(points, configs, corpus, ray_address, machine_share)


@dataclass(frozen=True)
class FinetuneInputs:
    settings: FinetuneSettings
    train_file: Path | None
    """None: the objective's built-in demo."""
    val_file: Path | None


def check_finetune(data: str | None, val_data: str | None, config_file: str | None,
                   overrides: dict[str, Any] | None) -> FinetuneInputs:
    """The finetune flow's settings and data files (the base model is checked as it is fetched)."""
    settings = build_config(FinetuneSettings, None, config_file, overrides)
    train_file = None if data in (None, BUILTIN_CORPUS) else _data_file(data)
    return FinetuneInputs(settings, train_file, _data_file(val_data) if val_data else None)


@dataclass(frozen=True)
class EvaluateInputs:
    config: EvaluateSettings
    sources: SourceResolution | None
    """The corpus's files; None without a corpus."""
    ray_address: str | None
    multiple_choice: Path | None
    classification: Path | None
    tagging: Path | None


def check_evaluate(corpus: list[str] | None, multiple_choice: str | None, classification: str | None,
                   tagging: str | None, overrides: dict[str, Any] | None, ray: str | None,
                   lm_eval: list[str] | None, lm_eval_tasks_dir: str | None) -> EvaluateInputs:
    """The evaluate flow's settings and what it scores the model on (the model is checked as it is
    fetched): its corpus, Ray cluster and files, each file read through."""
    config = build_config(EvaluateSettings, overrides=overrides)
    if not corpus and not multiple_choice and not classification and not tagging and not lm_eval:
        raise ConfigError("Nothing to evaluate: pass a corpus (--corpus PATH: loss, perplexity, bits per byte), "
                          "a multiple-choice file (--multiple-choice FILE), lm-evaluation-harness tasks (--lm-eval "
                          "TASKS) and/or, for a classifier, a labelled file (--classification FILE), for a tagger, "
                          "a file of texts and spans (--tagging FILE).")
    sources = resolve_sources(corpus) if corpus else None
    if corpus:
        load_url_blocklist(config.data.url_blocklist)
    ray_address = resolve_ray_address(ray) if corpus else None
    choice_file, labelled_file, spans_file = (Path(path).expanduser().resolve() if path else None
                                              for path in (multiple_choice, classification, tagging))
    if choice_file:
        # Reading the file checks every record: it takes the readers' and the tokenizer's libraries.
        from gptflow.data.multiple_choice import read_multiple_choice

        read_multiple_choice(choice_file)
    for path in (labelled_file, spans_file):
        if path:
            check_data_file(path)
    if lm_eval_tasks_dir and not Path(lm_eval_tasks_dir).is_dir():
        raise ConfigError(f"--lm-eval-tasks-dir {lm_eval_tasks_dir} is not a folder: give the folder of your "
                          "task YAMLs.")
    return EvaluateInputs(config, sources, ray_address, choice_file, labelled_file, spans_file)


def _data_file(path: str) -> Path:
    resolved = Path(path).expanduser().resolve()
    check_data_file(resolved)
    return resolved
