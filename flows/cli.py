"""The ``gptflow`` command line: its commands and their options, and how it reports an error.

A flow's command takes an option per parameter of the flow, read from the flow's own declaration
(``flows.arguments``); ``flows.commands`` holds what each command does. Both import only light
modules up front (no torch, Prefect, MLflow or pyarrow), and each command checks its input before
importing what it runs: a mistyped command is refused in a fraction of a second.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from gptflow.flows import commands
from gptflow.flows.arguments import NonNegativeInt, Option, PositiveFloat, PositiveInt, add_flow_options, number_type
from gptflow.flows.stack import StackError
from gptflow.model.config import SamplingConfig
from gptflow.tasks.runtime.rendezvous import DEFAULT_TIMEOUT_S

WORKSPACE = Option(metavar="DIR|s3://BUCKET/PREFIX")
SETTINGS = {
    "config_file": Option("--config", metavar="FILE"),
    "overrides": Option("--set", metavar="KEY=VALUE", takes=list[str]),
    "workspace": WORKSPACE,
    "ray": Option(metavar="ADDRESS"),
}
"""How the command line spells the settings every flow takes."""
MODEL_SOURCE = {"model": Option(metavar="SOURCE"), "tokenizer": Option(metavar="PATH"), "workspace": WORKSPACE}
"""A trained model as the evaluate flow takes it, and generate and export too."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # MLflow draws a progress bar per artifact copy, which floods logs of non-interactive runs, and
    # prints its own links to a run, which open its UI on the GenAI pages: the summary gives the link.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # MLflow retries a tracking server that does not answer for about eight minutes per call; a run
    # keeps its writes in its outbox instead (tasks/tracking/outbox.py), so one quick retry is enough.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    try:
        if args.command != "login":  # which logs in anew
            from gptflow.flows.login import apply_login

            apply_login()
        return args.handler(args)
    except KeyboardInterrupt:
        # What was running has ended its runs KILLED; the traceback of where Ctrl-C landed says nothing.
        print("gptflow: interrupted (Ctrl-C); its runs are marked KILLED, and the same command resumes a training "
              "from its latest checkpoint", file=sys.stderr)
        return 130
    except Exception as error:
        # Imported only now, and light: a refused command must not wait for torch, Prefect or MLflow.
        from gptflow.flows.user_errors import one_line, user_error
        from gptflow.tasks.runtime.workspace import Workspace

        workspace = Workspace.locate(getattr(args, "workspace", None))
        reported = error if isinstance(error, StackError) else user_error(error, workspace)
        if reported is not None:
            print(f"gptflow: error: {one_line(error, reported)}", file=sys.stderr)
            return 2
        if args.debug:
            raise
        print(f"gptflow: error: {type(error).__name__}: {error}\n  This is not an error gptflow knows how to explain: "
              f"{_keep_traceback(workspace)} (--debug prints it). Please report it with that file.", file=sys.stderr)
        return 1


def _keep_traceback(workspace: Path) -> str:
    """Write the traceback being handled into the workspace's logs/; say where it went."""
    import datetime
    import traceback

    try:
        logs = workspace / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        path = logs / f"error-{datetime.datetime.now():%Y%m%d-%H%M%S}.log"
        path.write_text(traceback.format_exc())
    except OSError:
        return "its traceback could not be written to the workspace"
    return f"its traceback is in {path}"


class OneLineParser(argparse.ArgumentParser):
    """Refuses a mistyped command (an unknown ``--preset``, option or command) in one line, as
    gptflow refuses everything else, rather than after argparse's usage text; ``-h`` shows that.
    Each command's parser is one too (``add_subparsers`` makes them of the parser's class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"gptflow: error: {message}; `{self.prog} -h` lists what it takes.\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``gptflow`` command; a command's ``handler`` runs it (``flows.commands``)."""
    parser = OneLineParser(
        prog="gptflow",
        description="Train your own GPT as a cached, tracked pipeline (Prefect + MLflow).",
    )
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an error gptflow cannot explain, instead of keeping it in the "
                        "workspace's logs/")
    subcommands = parser.add_subparsers(dest="command", required=True)
    _add_flow_commands(subcommands)
    _add_model_commands(subcommands)
    _add_workspace_commands(subcommands)
    return parser


def _add_flow_commands(subcommands: argparse._SubParsersAction) -> None:
    """pretrain, sweep, finetune and evaluate: an option per parameter of their flow."""
    pretrain = _add_flow_command(
        subcommands, "pretrain", commands.run_pretrain,
        {**SETTINGS, "corpus": Option(metavar="PATH[=WEIGHT]"), "init_from": Option(metavar="SOURCE"),
         "eval_corpus": Option(metavar="PATH")},
        help="ingest a corpus, train a tokenizer, tokenize, pretrain and evaluate",
        description="Run the pretrain flow locally. Every stage is cached: rerunning the same "
        "command executes nothing; changing a setting reruns that stage and those after it.",
    )
    _add_nproc_argument(pretrain)
    _add_rendezvous_arguments(pretrain, "this machine runs every stage, logs to MLflow and holds rank 0; run "
                              "`gptflow train-node` with the same --nnodes, --nproc-per-node and --rdzv-endpoint on "
                              "each other machine")
    _add_flow_command(
        subcommands, "sweep", commands.run_sweep,
        {**SETTINGS, "corpus": Option(metavar="PATH[=WEIGHT]"), "eval_corpus": Option(metavar="PATH"),
         "grid": Option(metavar="KEY=V1,V2,...", takes=list[str]),
         "random_points": Option("--random", metavar="N"), "seed": Option(metavar="S"),
         "max_parallel": Option(metavar="K"), "compute_budget": Option(metavar="FLOPS")},
        help="pretrain one model per point of a grid of settings and compare them in MLflow",
        description="Run the sweep flow: one pretrain child flow run per point of the --grid (every combination of "
        "the values, or --random N of them), up to --max-parallel at once. The data stages run once per distinct "
        "data.* and tokenizer.* setting, and each point's training is cached: rerunning with one more value trains "
        "only the new points. MLflow shows the sweep as one run with a nested run per point, a table of the points, "
        "their score against each swept setting and every point's val-loss curve; --eval-corpus scores every point "
        "on the same text.",
    )
    finetune = _add_flow_command(
        subcommands, "finetune", commands.run_finetune,
        {**SETTINGS, **MODEL_SOURCE, "data": Option(metavar="FILE"), "val_data": Option(metavar="FILE")},
        help="fine-tune a pretrained model for instructions (sft), classification or tagging, fully or with LoRA",
        description="Run the finetune flow locally: prepare the data with the base model's tokenizer, fine-tune, "
        "evaluate on the validation split, log and register the model in MLflow. Every stage is cached: rerunning "
        "the same command executes nothing. Without --data, a built-in demo drawn from the Python standard "
        "library's source.",
    )
    _add_nproc_argument(finetune)
    _add_flow_command(
        subcommands, "evaluate", commands.run_evaluate,
        {**SETTINGS, **MODEL_SOURCE, "corpus": Option(metavar="PATH"), "multiple_choice": Option(metavar="FILE"),
         "classification": Option(metavar="FILE"), "tagging": Option(metavar="FILE"),
         "lm_eval": Option(metavar="TASKS", takes=str), "lm_eval_limit": Option("--limit", metavar="N"),
         "lm_eval_num_fewshot": Option("--num-fewshot", metavar="K"), "lm_eval_tasks_dir": Option(metavar="DIR")},
        help="score a trained model: loss on a corpus split, multiple-choice accuracy, samples, classification, tagging",
        description="Run the evaluate flow locally. The corpus is tokenized with the model's own tokenizer, and "
        "every stage is cached on the model's weights: rerunning the same command executes nothing.",
    )


def _add_flow_command(subcommands: argparse._SubParsersAction, flow: str,
                      handler: Callable[[argparse.Namespace], int], options: dict[str, Option],
                      **parser: str) -> argparse.ArgumentParser:
    """The command ``flow``: the flow's parameters as options, spelled as ``options`` says."""
    command = subcommands.add_parser(flow, **parser)
    command.set_defaults(handler=handler, flow_parameters=add_flow_options(command, flow, options))
    return command


def _add_model_commands(subcommands: argparse._SubParsersAction) -> None:
    """generate, export and import: a trained model, outside any flow."""
    sampling = SamplingConfig()
    generate = subcommands.add_parser(
        "generate", help="sample continuations of prompts from a trained model",
        description="Print a trained model's continuation of each prompt (the prompt included), or, for a model "
        "fine-tuned with --objective sft, its answer (up to its end token) to each prompt as a user message of its chat "
        "template. Without --prompt, each line of standard input is a prompt. Generation reads the prompt once and "
        "then one token per step (KV cache); no Prefect flow is involved.",
    )
    add_flow_options(generate, "evaluate", MODEL_SOURCE, only=list(MODEL_SOURCE))
    generate.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT",
                          help="text to continue; repeatable. Default: one prompt per line of standard input")
    generate.add_argument("--max-new-tokens", type=number_type(NonNegativeInt), default=sampling.max_new_tokens,
                          metavar="N", help=f"tokens to sample per prompt (default {sampling.max_new_tokens})")
    generate.add_argument("--temperature", type=number_type(PositiveFloat), default=sampling.temperature, metavar="T",
                          help=f"sampling temperature; lower is more conservative (default {sampling.temperature})")
    generate.add_argument("--top-k", type=number_type(NonNegativeInt), default=sampling.top_k, metavar="K",
                          help=f"sample among the K most likely tokens only; 0: all (default {sampling.top_k})")
    generate.add_argument("--seed", type=number_type(NonNegativeInt), default=sampling.seed, metavar="S",
                          help=f"sampling seed: the same prompt and seed give the same text (default {sampling.seed})")
    generate.add_argument("--device", default="auto",
                          help="auto (CUDA, then MPS, then CPU; the default) or a torch device such as cpu or cuda:1")
    generate.set_defaults(handler=commands.run_generate)

    export = subcommands.add_parser(
        "export", help="write a trained model as a Hugging Face transformers folder",
        description="Write the model, its tokenizer and a generation config as a folder that transformers loads "
        "(AutoModelForCausalLM / AutoTokenizer.from_pretrained): GPT-2-recipe models as GPT2LMHeadModel, "
        "rotary + RMSNorm + SwiGLU models as LlamaForCausalLM (Qwen3ForCausalLM with QK-norm). Other recipes "
        "are refused with the switches in the way.",
    )
    add_flow_options(export, "evaluate", MODEL_SOURCE, only=list(MODEL_SOURCE))
    export.add_argument("--out", required=True, metavar="DIR", help="the folder to create (new or empty)")
    export.set_defaults(handler=commands.run_export)

    import_ = subcommands.add_parser(
        "import", help="import a Hugging Face transformers checkpoint (GPT-2, Llama, Mistral, Qwen2, Qwen3) and "
        "register it in MLflow",
        description="Read a transformers checkpoint folder (config.json, safetensors weights, tokenizer.json) or "
        "a Hugging Face Hub id into a gptflow model that computes its logits, with its own tokenizer (gptflow's "
        "<|endoftext|> and <|pad|> added where missing), and register it as gptflow-import-<name>. Then fine-tune, "
        "evaluate, generate or export it as any gptflow model.",
    )
    import_.add_argument("--model", required=True, metavar="FOLDER_OR_HUB_ID",
                         help="a transformers checkpoint folder, or a Hub id (owner/name) when online")
    import_.add_argument("--revision", metavar="R", help="the Hub revision (branch, tag or commit) to fetch")
    import_.add_argument("--block-size", type=number_type(PositiveInt), metavar="N",
                         help="the context to train and generate with (default: the checkpoint's maximum)")
    add_flow_options(import_, "evaluate", MODEL_SOURCE, only=("workspace",))  # the workspace as every flow takes it
    import_.set_defaults(handler=commands.run_import)


def _add_workspace_commands(subcommands: argparse._SubParsersAction) -> None:
    """serve, up, down, sync, train-node and presets: the servers, the outbox, the other nodes, the presets."""
    serve = subcommands.add_parser(
        "serve", help="serve every deployment (pretrain/train-gpt, sweep/compare-settings, finetune/tune-pretrained, "
        "evaluate/score-model) to a Prefect server until Ctrl-C",
        description="Serve gptflow's deployments. Start runs with `prefect deployment run 'pretrain/train-gpt'`. "
        "Needs PREFECT_API_URL pointing at a Prefect server (see `gptflow up`).",
    )
    serve.set_defaults(handler=commands.run_serve)
    worker = subcommands.add_parser(
        "worker", help="run the team's deployment runs on this machine: a worker of the Prefect work pool gptflow",
        description="Create the process work pool and the automation that marks a flow run Crashed when its "
        "heartbeats stop (unless they exist), then run `prefect worker start --pool POOL` with gptflow's login. "
        "Runs start with `prefect deployment run 'pretrain/train-gpt'` once `prefect deploy --all` registered them.")
    worker.add_argument("--pool", default="gptflow", help="the work pool (default gptflow, as in prefect.yaml)")
    worker.add_argument("--name", help="the worker's name in Prefect's UI (default: Prefect's)")
    worker.add_argument("--workspace", metavar="DIR|s3://BUCKET/PREFIX",
                        help="where the runs keep their data (default: $GPTFLOW_HOME or ./.gptflow); a `gptflow up` "
                        "running for it is used when no Prefect server is set")
    worker.set_defaults(handler=commands.run_worker)

    workspace_help = "workspace holding the servers' databases and artifacts (default: $GPTFLOW_HOME or ./.gptflow)"
    stack_up = subcommands.add_parser("up", help="start a local Prefect server and MLflow server for this workspace, "
                                      "or with --team a team's: on PostgreSQL, behind logins")
    stack_up.add_argument("--workspace", metavar="DIR|s3://BUCKET/PREFIX", help=workspace_help)
    stack_up.add_argument("--prefect-port", type=int, default=4200, help="Prefect server port (default 4200)")
    stack_up.add_argument("--mlflow-port", type=int, default=5000, help="MLflow server port (default 5000)")
    stack_up.add_argument("--host", default="127.0.0.1",
                          help="address both servers listen on (default 127.0.0.1); any other needs --team")
    _add_team_arguments(stack_up)
    stack_up.set_defaults(handler=commands.run_up)
    stack_down = subcommands.add_parser("down", help="stop the servers that `gptflow up` started")
    stack_down.add_argument("--workspace", metavar="DIR", help=workspace_help)
    stack_down.set_defaults(handler=commands.run_down)

    _add_login_commands(subcommands)

    push_history = subcommands.add_parser(
        "push-history", help="copy this workspace's MLflow history into a team's MLflow server",
        description="Copy the experiments, runs (params, metric histories, tags, artifacts, logged models, sweeps "
        "with their points nested) and registered models (versions and aliases) of the workspace's own MLflow store "
        "into the MLflow server you logged in to (or --to), as the logged-in user. Running it again copies only "
        "what is not there yet.")
    push_history.add_argument("--to", metavar="URL", help="the MLflow server (default: the one of `gptflow login`)")
    push_history.add_argument("--workspace", metavar="DIR", help="the workspace you trained in (default: "
                              "$GPTFLOW_HOME or ./.gptflow)")
    push_history.set_defaults(handler=commands.run_push_history)

    sync = subcommands.add_parser(
        "sync", help="send the MLflow writes that runs kept in the workspace while the tracking server was down",
        description="Send every run's MLflow outbox (<workspace>/mlflow-outbox/): the metrics, params, tags, "
        "artifacts, logged and registered models and end states that runs kept while their tracking server could "
        "not be reached, in the order the runs made them. Exits 1 if some are still kept.",
    )
    sync.add_argument("--workspace", metavar="DIR",
                      help="the workspace of the runs (default: $GPTFLOW_HOME or ./.gptflow)")
    sync.set_defaults(handler=commands.run_sync)

    train_node = subcommands.add_parser(
        "train-node", help="join a `gptflow pretrain --nnodes N` training from another machine",
        description="Start this machine's training processes for the `gptflow pretrain --nnodes N ... --rdzv-endpoint "
        "HOST:PORT` that runs on the head node, and wait until the training ends. They take the training job from "
        "the head through torchrun's c10d rendezvous and read the token shards from the same workspace; only the "
        "head logs to MLflow and writes artifacts. Slurm and Kubernetes run this on every node but the head "
        "(examples/).",
    )
    _add_rendezvous_arguments(train_node, "this machine's processes join the head node's training there")
    train_node.add_argument("--workspace", metavar=WORKSPACE.metavar,
                            help="the head node's workspace: the same s3:// URL, or a folder shared by every node "
                            "(default: $GPTFLOW_HOME or ./.gptflow)")
    train_node.set_defaults(handler=commands.run_train_node)

    presets = subcommands.add_parser(
        "presets", help="list the named configurations, with their parameter counts and memory per GPU",
        description="Each preset's settings, parameter count, and estimated memory per GPU while training, with ddp "
        "(every GPU holds the whole model) and with fsdp (weights, gradients and AdamW state sharded over the GPUs).")
    presets.add_argument("--gpus", type=int, default=8, metavar="N",
                         help="GPUs the fsdp estimate shards over (default 8)")
    presets.set_defaults(handler=commands.run_presets)


def _add_team_arguments(stack_up: argparse.ArgumentParser) -> None:
    """``gptflow up --team``: PostgreSQL, logins, proxied artifacts (``flows.team.TeamOptions``)."""
    from gptflow.flows.team import DEFAULT_RETENTION_DAYS

    team = stack_up.add_argument_group("team stack")
    team.add_argument("--team", action="store_true",
                      help="run the servers on PostgreSQL with logins on (MLflow users, a Prefect auth string) and "
                      "MLflow artifacts proxied to the object store")
    team.add_argument("--database", metavar="postgresql://USER@HOST:PORT",
                      help="an existing PostgreSQL server (its password in PGPASSWORD); default: a cluster gptflow "
                      "initialises in the workspace's team/postgres/")
    team.add_argument("--postgres-port", type=int, default=5432, help="the local cluster's port (default 5432)")
    team.add_argument("--artifacts-destination", metavar="URI",
                      help="where MLflow keeps artifacts (default: the workspace's s3:// bucket, under mlartifacts/)")
    team.add_argument("--allowed-hosts", metavar="HOSTS",
                      help="host names MLflow answers to, comma-separated (the reverse proxy's public name)")
    team.add_argument("--prefect-public-url", metavar="URL",
                      help="where browsers open Prefect's UI through the reverse proxy (its UI calls the API there)")
    team.add_argument("--retention-days", type=number_type(PositiveInt), default=DEFAULT_RETENTION_DAYS,
                      help=f"days Prefect keeps finished flow runs, their logs and events (default "
                      f"{DEFAULT_RETENTION_DAYS})")


def _add_login_commands(subcommands: argparse._SubParsersAction) -> None:
    """login, and user: a teammate's credentials, and the admin's management of users."""
    from gptflow.flows.team import PERMISSIONS

    login = subcommands.add_parser(
        "login", help="log in to a team stack once; every gptflow command and the Prefect CLI then use it",
        description="Check the credentials against both servers and keep them, readable by you alone, in "
        "~/.config/gptflow/login.json ($GPTFLOW_LOGIN_FILE) and the current Prefect profile. The Prefect auth string "
        "and the MLflow password are asked for without echo, or read from PREFECT_API_AUTH_STRING and "
        "MLFLOW_TRACKING_PASSWORD.")
    login.add_argument("--prefect", required=True, metavar="URL", help="the team's Prefect server")
    login.add_argument("--mlflow", required=True, metavar="URL", help="the team's MLflow server")
    login.add_argument("--username", required=True, help="your MLflow user name")
    login.set_defaults(handler=commands.run_login)

    user = subcommands.add_parser(
        "user", help="add or remove a team member, or grant one access to experiments (as the admin)",
        description="Manage the MLflow users of a team stack, as its admin: on the machine where `gptflow up --team` "
        "runs, or logged in as admin. A new user sees nothing until granted.")
    # --workspace after the user name, where a command's options go.
    on_workspace = argparse.ArgumentParser(add_help=False)
    on_workspace.add_argument("--workspace", metavar="DIR|s3://BUCKET/PREFIX",
                              help="the workspace of the running `gptflow up --team`, whose admin acts")
    actions = user.add_subparsers(dest="action", required=True, metavar="add|remove|grant", help="what to do")
    add = actions.add_parser("add", parents=[on_workspace],
                             help="add a user; the password is asked for (or GPTFLOW_NEW_USER_PASSWORD)")
    add.add_argument("username", help="the login name to create")
    remove = actions.add_parser("remove", parents=[on_workspace], help="remove a user")
    remove.add_argument("username", help="the login name to remove")
    grant = actions.add_parser("grant", parents=[on_workspace],
                               help="grant a user read, edit or manage (or none) on experiments")
    grant.add_argument("username", help="the login name to grant to")
    grant.add_argument("permission", choices=list(PERMISSIONS), metavar="PERMISSION", help="what the user may do: %(choices)s")
    grant.add_argument("--experiment", dest="experiments", action="append", metavar="NAME",
                       help="an experiment, repeatable; default: gptflow's four, and every registered model")
    user.set_defaults(handler=commands.run_user)


def _add_nproc_argument(parser: argparse.ArgumentParser) -> None:
    """--nproc: ``train.nproc``, for pretrain and finetune."""
    parser.add_argument("--nproc", type=int, metavar="N",
                        help="train data-parallel on N GPUs (or CPU processes) via torchrun, each taking "
                        "train.micro_batch_size examples per micro-step; same as --set train.nproc=N "
                        "(--set train.parallelism=fsdp shards the model)")


def _add_rendezvous_arguments(parser: argparse.ArgumentParser, role: str) -> None:
    """--nnodes, --nproc-per-node, --rdzv-endpoint and --rdzv-timeout: a ``tasks.runtime.rendezvous.Rendezvous``."""
    parser.add_argument("--nnodes", type=int, metavar="N",
                        help=f"train on N machines that meet at --rdzv-endpoint (torchrun's c10d rendezvous); {role}")
    parser.add_argument("--nproc-per-node", type=int, metavar="M",
                        help="training processes (GPUs) on each machine (default 1); train.nproc becomes N x M")
    parser.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                        help="where the machines meet: a free port of the head node that every node reaches")
    parser.add_argument("--rdzv-timeout", type=float, metavar="SECONDS",
                        help=f"how long to wait for every node to join before failing (default {DEFAULT_TIMEOUT_S:g}); "
                        "on the other nodes it must cover the head's data stages")


if __name__ == "__main__":
    sys.exit(main())
