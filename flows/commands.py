"""What each ``gptflow`` command does with its parsed arguments (``flows.cli`` declares them).

A command imports torch, Prefect or MLflow only once its input is checked: a flow's command runs
the flow's own check (``flows.checks``) before it imports the flow.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import threading
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gptflow.flows.checks import check_evaluate, check_finetune, check_pretrain, check_sweep
from gptflow.flows.login import check_credentials
from gptflow.flows.stack import down, keep_prefect_state_in, up, use_running_stack
from gptflow.flows.team import ADMIN_USER, TeamError, TeamOptions, TeamSecrets, secrets_file
from gptflow.flows.temporary_server import TemporaryPrefectServer
from gptflow.model.config import SamplingConfig
from gptflow.tasks.runtime.rendezvous import Rendezvous, RendezvousError
from gptflow.tasks.runtime.workspace import WORKSPACE_ENV, Workspace
from gptflow.tasks.settings import DEFAULT_PRESET, PRESETS, PretrainSettings, build_config, parse_override_pairs

if typing.TYPE_CHECKING:  # the command line imports torch and MLflow only for the commands that need them
    from gptflow.tasks.model_source import ResolvedModel

SAMPLE_SEPARATOR = "-" * 40
"""Printed between the samples of ``gptflow generate``, which may span many lines."""


def run_pretrain(args: argparse.Namespace) -> int:
    parameters = _flow_parameters(args)
    overrides = parameters["overrides"] = parse_override_pairs(args.overrides or [])
    rendezvous = parameters["rendezvous"] = Rendezvous.from_flags(args.nnodes, args.nproc_per_node,
                                                                  args.rdzv_endpoint, args.rdzv_timeout)
    if args.nproc is not None and args.nnodes is not None:
        raise RendezvousError("--nproc counts processes on one machine: with --nnodes, give --nproc-per-node instead.")
    if args.nproc is not None or args.nproc_per_node is not None:
        overrides["train.nproc"] = (args.nnodes or 1) * (args.nproc or args.nproc_per_node)
    check_pretrain(args.corpus, args.preset, args.config_file, overrides, args.ray, rendezvous, args.init_from,
                   args.eval_corpus)
    _run_flow("pretrain", parameters)
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    from gptflow.tasks.sweep_plan import parse_grid

    parameters = _flow_parameters(args)
    overrides = parameters["overrides"] = parse_override_pairs(args.overrides or [])
    grid = parameters["grid"] = parse_grid(args.grid or [])
    check_sweep(grid, args.corpus, args.preset, args.config_file, overrides, args.random_points, args.seed,
                args.scaling, args.max_parallel, args.ray, args.eval_corpus)
    summary = _run_flow("sweep", parameters)
    if summary.failed:
        print(f"gptflow: {len(summary.failed)} of {len(summary.outcomes)} sweep points failed", file=sys.stderr)
        return 1
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    parameters = _flow_parameters(args)
    overrides = parameters["overrides"] = parse_override_pairs(args.overrides or [])
    if args.nproc is not None:
        overrides["train.nproc"] = args.nproc
    check_finetune(args.data, args.val_data, args.config_file, overrides)
    _run_flow("finetune", parameters, choose_defaults=_choose_base_model)
    return 0


def _choose_base_model(parameters: dict[str, Any], workspace: Workspace) -> None:
    """Without --model, the newest pretrained model, said on stderr: a workspace with none is
    refused in one line before the flow starts (the flow would choose the same way)."""
    if parameters["model"] is None:
        from gptflow.tasks.tracking.registry import default_base_model

        parameters["model"], choice = default_base_model(workspace)
        print(f"gptflow: {choice}", file=sys.stderr)


def run_evaluate(args: argparse.Namespace) -> int:
    parameters = _flow_parameters(args)
    overrides = parameters["overrides"] = parse_override_pairs(args.overrides or [])
    lm_eval = parameters["lm_eval"] = ([name.strip() for name in args.lm_eval.split(",") if name.strip()]
                                       if args.lm_eval else None)
    check_evaluate(args.corpus, args.multiple_choice, args.classification, args.tagging, overrides, args.ray, lm_eval,
                   args.lm_eval_tasks_dir)
    _run_flow("evaluate", parameters)
    return 0


def _flow_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The flow's parameters as the command line gave them (``flows.arguments.add_flow_options``)."""
    return {name: getattr(args, name) for name in args.flow_parameters}


def _run_flow(name: str, parameters: dict[str, Any],
              choose_defaults: Callable[[dict[str, Any], Workspace], None] | None = None) -> Any:
    """Run the flow ``name`` with ``parameters``, print its summary and return it. Its module imports Prefect,
    so only once the input is known good; on the workspace's ``gptflow up`` stack, if one runs and
    no Prefect server is set (``stack.use_running_stack``; said on stderr). ``choose_defaults`` fills
    in parameters from the tracking store the flow will use, before the flow starts."""
    started = time.monotonic()  # the command's start, less the interpreter's and reading its input (under a second)
    # Prefect's temporary server would otherwise log an error on every start on offline machines.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    workspace = Workspace.resolve(parameters["workspace"])
    stack = use_running_stack(workspace)
    if stack is not None:
        print(f"gptflow: using the servers `gptflow up` started for {stack.workspace}: Prefect "
              f"{stack.prefect_api_url.removesuffix('/api')}, MLflow {os.environ['MLFLOW_TRACKING_URI']}",
              file=sys.stderr)
    keep_prefect_state_in(workspace)
    server = None
    if "PREFECT_API_URL" not in os.environ:  # one starts now, while the flow's imports run (flows.temporary_server)
        server = TemporaryPrefectServer.start(workspace.root / "logs")
    check_credentials(dict(os.environ))
    if choose_defaults is not None:
        choose_defaults(parameters, workspace)
    flow = getattr(importlib.import_module(f"gptflow.flows.{name}"), name)
    if server is not None:
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        server.wait_until_ready(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(),
                                lambda waiting: print(f"gptflow: {waiting}", file=sys.stderr))
    summary = dataclasses.replace(flow(**parameters), command_s=time.monotonic() - started)
    print(summary.render())
    return summary


def run_train_node(args: argparse.Namespace) -> int:
    """Join the head node's training: this machine's ranks, nothing logged or written here."""
    import subprocess

    rendezvous = Rendezvous.from_flags(args.nnodes, args.nproc_per_node, args.rdzv_endpoint, args.rdzv_timeout)
    if rendezvous is None:
        raise RendezvousError("gptflow train-node joins a training on several machines: --nnodes must be at least 2 "
                              "(on one machine, gptflow pretrain --nproc N trains alone).")
    Workspace.resolve(args.workspace)  # a missing bucket is refused now, not by every rank
    command = [*rendezvous.torchrun_command(), "-m", "gptflow.tasks.stages.training_job", "--join",
               *([args.workspace] if args.workspace else [])]
    print(f"gptflow: joining the training at {rendezvous.endpoint} with {rendezvous.nproc_per_node} process(es); "
          f"waiting up to {rendezvous.timeout_s:g} s for the head node", file=sys.stderr, flush=True)
    environment = {**os.environ, "GPTFLOW_RDZV_TIMEOUT": str(rendezvous.timeout_s)}
    output = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment) as ranks:
        for line in ranks.stdout:
            print(line, end="", flush=True)
            output = [*output[-199:], line]
    if ranks.returncode != 0:
        raise rendezvous.failure("".join(output), ranks.returncode) or RuntimeError(
            f"this node's training ranks failed (torchrun exit code {ranks.returncode}); their output is above")
    print(f"gptflow: this node's share of the training at {rendezvous.endpoint} is done", file=sys.stderr)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from gptflow.data.chat import Message
    from gptflow.model.device import resolve_device
    from gptflow.model.finetune import answer
    from gptflow.model.generate import generate_texts

    device = resolve_device(args.device)
    source = _resolve_model(args)
    source.require_text_model("gptflow generate")
    model, tokenizer = source.load(device), source.load_tokenizer()
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.seed)
    if args.prompts:
        prompts = args.prompts
    else:
        if sys.stdin.isatty():
            print("Type a prompt and press Enter; Ctrl-D ends.", file=sys.stderr)
        prompts = (line.removesuffix("\n") for line in sys.stdin)  # each answered as soon as it is read
    for index, prompt in enumerate(prompts):
        # One prompt at a time, each seeded by --seed alone: a prompt's sample does not depend on
        # the prompts before it.
        if source.kind == "chat_model":  # its prompts are user messages of its chat template
            (sample,) = answer(model, tokenizer, source.chat_template, [[Message("user", prompt)]], sampling)
        else:
            (sample,) = generate_texts(model, tokenizer, [prompt], sampling, device)
        print(f"{SAMPLE_SEPARATOR}\n{sample}" if index else sample, flush=True)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from gptflow.model.export import export_to_transformers

    source = _resolve_model(args)
    source.require_text_model("gptflow export")
    out = Path(args.out).expanduser()
    architecture = export_to_transformers(source.load(), source.tokenizer_file, out)
    print(f"exported {source.source} as {architecture} to {out}")
    print(f"load it with transformers: AutoModelForCausalLM.from_pretrained({str(out)!r}), "
          f"AutoTokenizer.from_pretrained({str(out)!r})")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from gptflow.tasks.stages.model_import import import_checkpoint

    workspace = Workspace.resolve(args.workspace)
    print(import_checkpoint(args.model, workspace, args.revision, args.block_size).render())
    return 0


def _resolve_model(args: argparse.Namespace) -> ResolvedModel:
    """The model named by --model (with --tokenizer, --workspace)."""
    from gptflow.tasks.model_source import resolve_model

    return resolve_model(args.model, Workspace.resolve(args.workspace), args.tokenizer)


def run_serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from gptflow.flows.deployments import serve_deployments

    check_credentials(dict(os.environ))
    server = os.environ.get("MLFLOW_TRACKING_URI", "")
    if server.startswith("http"):
        tables = _runs_tables(server, Workspace.resolve())
        print("The served flows' MLflow runs, one experiment per kind of work:")
        print("\n".join(f"  {line}" for line in tables))
    serve_deployments()
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from gptflow.flows.worker import start_worker

    # The runs' workspace, named for them: they start in gptflow's own folder (prefect.yaml), whose
    # ./.gptflow is no place for data.
    workspace = Workspace.resolve(args.workspace)
    os.environ[WORKSPACE_ENV] = workspace.url or str(workspace.root)
    use_running_stack(workspace)
    check_credentials(dict(os.environ))
    start_worker(args.pool, args.name)


def run_up(args: argparse.Namespace) -> int:
    workspace = Workspace.resolve(args.workspace)
    team = TeamOptions(args.database, args.postgres_port, args.artifacts_destination, args.allowed_hosts,
                       args.retention_days, args.prefect_public_url) if args.team else None
    # What makes the experiments once the servers answer is imported while they start: seconds of
    # MLflow's imports off the wait.
    threading.Thread(target=importlib.import_module, args=("gptflow.tasks.tracking.experiments",), daemon=True).start()
    # On stderr: stdout holds the addresses and the variables, for scripts to read.
    def report(line: str) -> None:
        print(f"gptflow: {line}", file=sys.stderr, flush=True)

    stack = up(workspace, report, prefect_port=args.prefect_port, mlflow_port=args.mlflow_port, host=args.host,
               team=team)
    report("finding or making the experiments on the MLflow server (seconds on a busy machine)")
    # The experiments are made as a flow on this workspace makes them while the stack runs.
    os.environ.update(stack.environment())
    if stack.team:
        os.environ.update(TeamSecrets.load(workspace.root).client_environment())
    first, *others = _runs_tables(stack.mlflow_url, workspace)
    print(f"Prefect UI   {stack.prefect_api_url.removesuffix('/api')}")
    print(f"MLflow UI    {first}")
    print("\n".join(f"             {line}" for line in others))
    print(f"workspace    {stack.workspace} (databases, artifacts, logs/)")
    print("\ngptflow pretrain, sweep, finetune and evaluate on this workspace use it while it runs. Point other "
          "gptflow, prefect and mlflow commands at it:\n")
    for name, value in stack.environment().items():
        print(f"export {name}={value}")
    if stack.team:
        print(f"\nLogins are on. On this machine gptflow logs in as {ADMIN_USER} with the secrets in "
              f"{secrets_file(workspace.root)} (mode 0600). Add teammates with `gptflow user add NAME` and `gptflow "
              "user grant NAME edit`; they run `gptflow login` once.")
    print("\nThen: gptflow serve   (and, in another shell, prefect deployment run 'pretrain/train-gpt' --watch)")
    return 0


def run_login(args: argparse.Namespace) -> int:
    import getpass

    from gptflow.flows.login import Login, log_in

    # From the variables when set (scripts), else asked for without echo: never on the command line.
    auth_string = os.environ.get("PREFECT_API_AUTH_STRING") or getpass.getpass("Prefect auth string: ")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD") or getpass.getpass(f"MLflow password of {args.username}: ")
    path = log_in(Login(args.prefect.rstrip("/") + ("" if args.prefect.rstrip("/").endswith("/api") else "/api"),
                        auth_string, args.mlflow.rstrip("/"), args.username, password))
    print(f"logged in to {args.prefect} and {args.mlflow} as {args.username}; kept in {path} (mode 0600) and the "
          "current Prefect profile")
    return 0


def run_user(args: argparse.Namespace) -> int:
    import getpass

    from gptflow.flows.team import manage_user

    use_running_stack(Workspace.resolve(args.workspace))  # on the server: as its admin
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not tracking_uri.startswith("http"):
        raise TeamError("No team MLflow server: run this where `gptflow up --team` runs, or `gptflow login` as admin.")
    password = None
    if args.action == "add":
        password = os.environ.get("GPTFLOW_NEW_USER_PASSWORD") or getpass.getpass(f"Password for {args.username}: ")
    print(manage_user(tracking_uri, args.action, args.username, password, getattr(args, "permission", None),
                      getattr(args, "experiments", None)))
    return 0


def _runs_tables(server: str, workspace: Workspace) -> list[str]:
    """A line per kind of work: its experiment on the MLflow server at ``server`` (created if new)
    and the address of its runs table there."""
    from mlflow import MlflowClient

    from gptflow.tasks.tracking.experiments import runs_tables

    tables = runs_tables(MlflowClient(server), workspace)
    width = max(map(len, tables))
    return [f"{name:<{width}}  {address}" for name, address in tables.items()]


def run_push_history(args: argparse.Namespace) -> int:
    from gptflow.tasks.tracking.history_copy import HistoryCopyError, copy_history

    destination = (args.to or os.environ.get("MLFLOW_TRACKING_URI", "")).rstrip("/")
    if not destination.startswith("http"):
        raise HistoryCopyError("No MLflow server to copy the history to: run `gptflow login` first, or give --to URL.")
    os.environ["MLFLOW_TRACKING_URI"] = destination
    check_credentials({name: value for name, value in os.environ.items() if name.startswith("MLFLOW_")})
    summary = copy_history(Workspace.resolve(args.workspace).root, destination,
                           lambda line: print(f"gptflow: {line}", file=sys.stderr, flush=True))
    print(f"copied to {destination}: {summary.line()}")
    return 0


def run_down(args: argparse.Namespace) -> int:
    stopped = down(Workspace.resolve(args.workspace))
    print(f"stopped: {', '.join(stopped)}" if stopped else "no gptflow stack was running for this workspace")
    return 0


def run_sync(args: argparse.Namespace) -> int:
    from gptflow.tasks.tracking.outbox import send_outboxes

    workspace = Workspace.resolve(args.workspace)
    check_credentials(dict(os.environ))
    reports = send_outboxes(workspace)
    if not reports:
        print(f"nothing to send: no run of {workspace.root} keeps MLflow writes")
    for report in reports:
        print(report)
    return 1 if any(report.kept for report in reports) else 0


def run_presets(args: argparse.Namespace) -> int:
    import dataclasses

    from gptflow.model.config import pad_vocab_size
    from gptflow.model.memory import training_memory

    print(f"Memory per GPU while training, estimated: float32 weights and gradients, optimizer state, activations "
          f"of one micro batch (bf16 autocast); CUDA context and fragmentation come on top. fsdp over {args.gpus} "
          "GPUs (--gpus).\n")
    for name, preset in PRESETS.items():
        settings = build_config(PretrainSettings, name)
        # The tokenizer may learn fewer tokens than asked; the model pads what it learned to a multiple of 128.
        model = dataclasses.replace(settings.model, vocab_size=pad_vocab_size(settings.tokenizer.vocab_size))
        ddp = training_memory(model, settings.train, "ddp")
        fsdp = training_memory(model, settings.train, "fsdp", gpus=args.gpus)
        marker = " (default)" if name == DEFAULT_PRESET else ""
        print(f"{name}{marker}: {_count(ddp.parameters)} parameters; per GPU {_gib(ddp.total)} with ddp, "
              f"{_gib(fsdp.total)} with fsdp on {args.gpus} (activations {_gib(ddp.activations)}, micro batch "
              f"{settings.train.micro_batch_size} x {model.block_size}"
              f"{', recomputed' if model.activation_checkpointing else ''}); trains with {settings.train.parallelism}")
        for section, values in preset.items():
            print(f"  {section}: {json.dumps(values)}")
    return 0


def _count(number: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if number >= scale:
            return f"{number / scale:.3g}{suffix}"
    return str(number)


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"

