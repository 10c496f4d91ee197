"""The ``gptflow`` command line: its commands and their options, and how it reports an error.

``flows.commands`` holds what each command does. Both import only light modules up front (no
torch, Prefect, MLflow or pyarrow), and each command checks its input before importing what it
runs: a mistyped command is refused in a fraction of a second.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from pathlib import Path

from gptflow.data.finetune_inputs import OBJECTIVES
from gptflow.data.sources import BUILTIN_CORPUS
from gptflow.flows import commands
from gptflow.flows.stack import StackError
from gptflow.model.config import SamplingConfig
from gptflow.tasks.runtime.rendezvous import DEFAULT_TIMEOUT_S
from gptflow.tasks.settings import DEFAULT_PRESET, PRESETS, EvalSplit

WORKSPACE_METAVAR = "DIR|s3://BUCKET/PREFIX"
WORKSPACE_HELP = ("artifact store and MLflow database: a folder, or an S3 prefix mirrored in $GPTFLOW_CACHE "
                  "(default: $GPTFLOW_HOME or ./.gptflow)")
RAY_HELP = ("run the data stages' per-file units on this Ray cluster (auto, HOST:PORT or ray://HOST:PORT; default "
            "$GPTFLOW_RAY_ADDRESS), each a Prefect task run; without it, they run in the stage's process")


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
        return args.handler(args)
    except Exception as error:
        # Imported only now, and light: a refused command must not wait for torch, Prefect or MLflow.
        from gptflow.flows.user_errors import user_error
        from gptflow.tasks.runtime.workspace import Workspace

        workspace = Workspace.locate(getattr(args, "workspace", None))
        reported = error if isinstance(error, StackError) else user_error(error, workspace)
        if reported is not None:
            print(f"gptflow: error: {reported}", file=sys.stderr)
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


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``gptflow`` command; a command's ``handler`` runs it (``flows.commands``)."""
    parser = argparse.ArgumentParser(
        prog="gptflow",
        description="Train your own GPT as a cached, tracked pipeline (Prefect + MLflow).",
    )
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an error gptflow cannot explain, instead of keeping it in the "
                        "workspace's logs/")
    subcommands = parser.add_subparsers(dest="command", required=True)

    pretrain = subcommands.add_parser(
        "pretrain",
        help="ingest a corpus, train a tokenizer, tokenize, pretrain and evaluate",
        description="Run the pretrain flow locally. Every stage is cached: rerunning the same "
        "command executes nothing; changing a setting reruns that stage and those after it.",
    )
    _add_pretrain_settings_arguments(pretrain)
    pretrain.add_argument("--nproc", type=int, metavar="N",
                          help="train data-parallel on N GPUs (or CPU processes) via torchrun; "
                          "same as --set train.nproc=N")
    _add_rendezvous_arguments(pretrain, "this machine runs every stage, logs to MLflow and holds rank 0; run "
                              "`gptflow train-node` with the same --nnodes, --nproc-per-node and --rdzv-endpoint on "
                              "each other machine")
    pretrain.add_argument("--restart", action="store_true",
                          help="train from step 0, deleting the checkpoints of an earlier training at these exact "
                          "settings; without it, a training that stopped early resumes from its latest checkpoint")
    pretrain.add_argument("--retrain-tokenizer", action="store_true",
                          help="train a new tokenizer instead of keeping the one earlier runs over this "
                          "corpus used (re-tokenizes every file)")
    pretrain.add_argument("--from-scratch", action="store_true",
                          help="train a new model instead of continuing the latest compatible one of this "
                          "corpus on the data added since")
    pretrain.add_argument("--init-from", metavar="SOURCE",
                          help="continue pretraining this model (models:/name/version, a run id or a model folder, "
                          "e.g. what `gptflow import` registered): its tokenizer, shape and weights; no tokenizer is "
                          "trained and the preset's model.* settings are not used")
    pretrain.add_argument("--ray", metavar="ADDRESS", help=RAY_HELP)
    pretrain.set_defaults(handler=commands.run_pretrain)

    sweep = subcommands.add_parser(
        "sweep", help="pretrain one model per point of a grid of settings and compare them in MLflow",
        description="Run the sweep flow: one pretrain child flow run per point of the --grid (every combination of "
        "the values, or --random N of them), up to --max-parallel at once. The data stages run once for all points, "
        "and each point's training is cached: rerunning with one more value trains only the new points. MLflow "
        "shows the sweep as one run with a nested run per point, a table of the points, val loss against each "
        "swept setting and every point's val-loss curve.",
    )
    _add_pretrain_settings_arguments(sweep, every_point=True)
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="a setting to sweep and its values, e.g. --grid train.learning_rate=1e-3,3e-3,1e-2; "
                       "repeatable (the points are every combination). With --random, KEY=LOW..HIGH draws from a "
                       "range: log-uniform for decimals (1e-4..1e-2), uniform for whole numbers (2..8)")
    sweep.add_argument("--random", type=_positive_int, metavar="N",
                       help="train N points drawn at random from the grid instead of all of them")
    sweep.add_argument("--seed", type=_non_negative_int, default=0, metavar="S",
                       help="seed of the --random draw: the same seed draws the same points, and a larger N adds "
                       "points to them (default 0)")
    sweep.add_argument("--max-parallel", type=_positive_int, default=1, metavar="K",
                       help="points training at once (default 1): worker processes sharing this machine's cores, "
                       "or tasks on the --ray cluster")
    sweep.add_argument("--scaling", action="store_true",
                       help="fit Chinchilla's law L(N, D) = E + A/N^alpha + B/D^beta of the final val loss against "
                       "parameters N and training tokens D (sweep model.* sizes and train.max_steps), and log the "
                       "compute-optimal size for --compute-budget")
    sweep.add_argument("--compute-budget", type=_positive_float, metavar="FLOPS",
                       help="training FLOPs (6 x N x D) to give the compute-optimal model size for, e.g. 1e18 "
                       "(default: the costliest point's)")
    sweep.add_argument("--ray", metavar="ADDRESS",
                       help="train the points as tasks on this Ray cluster (auto, HOST:PORT or ray://HOST:PORT; "
                       "default $GPTFLOW_RAY_ADDRESS): its nodes must reach the workspace and the Prefect and MLflow "
                       "servers")
    sweep.set_defaults(handler=commands.run_sweep)

    finetune = subcommands.add_parser(
        "finetune",
        help="fine-tune a pretrained model for instructions (sft), classification or tagging, fully or with LoRA",
        description="Run the finetune flow locally: prepare the data with the base model's tokenizer, fine-tune, "
        "evaluate on the validation split, log and register the model in MLflow. Every stage is cached: rerunning "
        "the same command executes nothing. Without --data, a built-in demo drawn from the Python standard "
        "library's source.",
    )
    finetune.add_argument("--objective", default="sft", choices=OBJECTIVES,
                          help="sft: prompt/response pairs or chats, loss on the responses (default); "
                          "classification: texts with labels, a head on the last token; tagging: texts with labelled "
                          "character spans (or CoNLL files), a head on every token")
    finetune.add_argument("--model", metavar="SOURCE",
                          help="the base model: models:/name/version, runs:/<run id>/model, an MLflow run id, or a "
                          "directory holding model.safetensors and config.json. Default: the latest registered "
                          "gptflow-cpu (what `gptflow pretrain` trains)")
    finetune.add_argument("--data", metavar="FILE",
                          help='.jsonl, .json, .csv (gzip/zstd too) or .parquet. sft: {"prompt": ..., "response": ...} '
                          'or {"messages": [{"role": ..., "content": ...}, ...]} per record; classification: text and '
                          'label fields; tagging: {"text": ..., "spans": [[start, end, label], ...]} per record, or a '
                          "CoNLL file (.conll, .iob, .bio: a word and its tag per line). Default: the objective's "
                          "built-in demo (docstring → function; which standard-library package a function is from; "
                          "the Python token kind of each span of a function)")
    finetune.add_argument("--val-data", metavar="FILE",
                          help="validation examples in the same format; default: finetune.val_fraction of --data")
    finetune.add_argument("--tokenizer", metavar="PATH",
                          help="the base model's tokenizer.json, for a model directory without one beside or above it")
    finetune.add_argument("--config", metavar="FILE",
                          help="TOML or JSON file with [finetune], [train] and [sampling] tables of settings")
    finetune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a finetune.*, train.* or sampling.* setting, e.g. --set finetune.lora_rank=0 "
                          "(full fine-tune) or --set train.max_steps=300; repeatable")
    finetune.add_argument("--workspace", metavar=WORKSPACE_METAVAR, help=WORKSPACE_HELP)
    finetune.add_argument("--nproc", type=int, metavar="N",
                          help="fine-tune data-parallel on N GPUs (or CPU processes) via torchrun, each taking "
                          "train.micro_batch_size examples per micro-step; same as --set train.nproc=N "
                          "(--set train.parallelism=fsdp shards the model)")
    finetune.add_argument("--restart", action="store_true",
                          help="fine-tune from step 0, deleting the checkpoints of an earlier attempt at these exact "
                          "settings; without it, a fine-tuning that stopped early resumes from its latest checkpoint")
    finetune.set_defaults(handler=commands.run_finetune)

    evaluate = subcommands.add_parser(
        "evaluate",
        help="score a trained model: loss on a corpus split, multiple-choice accuracy, samples, classification, tagging",
        description="Run the evaluate flow locally. The corpus is tokenized with the model's own tokenizer, and "
        "every stage is cached on the model's weights: rerunning the same command executes nothing.",
    )
    _add_model_source_arguments(evaluate)
    evaluate.add_argument("--corpus", action="append", metavar="PATH",
                          help="files, folders, globs, s3:// URLs or hf:owner/name to measure loss, perplexity and "
                          "bits per byte on (read as pretrain reads --corpus); repeatable")
    evaluate.add_argument("--split", default="val", choices=typing.get_args(EvalSplit),
                          help="documents of the corpus to score: val (default; held out by document hash as "
                          "pretraining holds them out), train, or all")
    evaluate.add_argument("--multiple-choice", metavar="FILE",
                          help='HellaSwag-format JSONL (or JSON, parquet), a record per example {"ctx": ..., '
                          '"endings": [...], "label": N}: zero-shot acc and acc_norm')
    evaluate.add_argument("--lm-eval", metavar="TASKS",
                          help="comma-separated lm-evaluation-harness tasks (e.g. hellaswag,arc_easy), run on the model; "
                          "metrics logged as lm_eval/<task>/<metric> (pip install 'gptflow[lm-eval]')")
    evaluate.add_argument("--limit", type=_positive_int, metavar="N", help="examples per --lm-eval task (default: all)")
    evaluate.add_argument("--num-fewshot", type=_non_negative_int, metavar="K",
                          help="few-shot examples per --lm-eval prompt (default: each task's own)")
    evaluate.add_argument("--lm-eval-tasks-dir", metavar="DIR",
                          help="a folder of your own lm-evaluation-harness task YAMLs, usable by name in --lm-eval")
    evaluate.add_argument("--classification", metavar="FILE",
                          help="for a fine-tuned classifier: a JSONL, JSON, CSV or parquet file of text + label (fields data.text_field "
                          "and eval.label_field): accuracy, macro-F1 and a confusion matrix")
    evaluate.add_argument("--tagging", metavar="FILE",
                          help='for a fine-tuned tagger: {"text": ..., "spans": [[start, end, label], ...]} records '
                          "(text field data.text_field) or a CoNLL file: span precision, recall and F1 per label "
                          "(exact match) and a token confusion matrix")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a data.*, tokenize.*, eval.* or sampling.* setting, e.g. --set "
                          "eval.eval_tokens=65536; "
                          "repeatable")
    evaluate.add_argument("--ray", metavar="ADDRESS", help=RAY_HELP)
    evaluate.set_defaults(handler=commands.run_evaluate)

    sampling = SamplingConfig()
    generate = subcommands.add_parser(
        "generate", help="sample continuations of prompts from a trained model",
        description="Print a trained model's continuation of each prompt (the prompt included), or, for a model "
        "fine-tuned with --objective sft, its answer (up to its end token) to each prompt as a user message of its chat "
        "template. Without --prompt, each line of standard input is a prompt. Generation reads the prompt once and "
        "then one token per step (KV cache); no Prefect flow is involved.",
    )
    _add_model_source_arguments(generate)
    generate.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT",
                          help="text to continue; repeatable. Default: one prompt per line of standard input")
    generate.add_argument("--max-new-tokens", type=_non_negative_int, default=sampling.max_new_tokens, metavar="N",
                          help=f"tokens to sample per prompt (default {sampling.max_new_tokens})")
    generate.add_argument("--temperature", type=_positive_float, default=sampling.temperature, metavar="T",
                          help=f"sampling temperature; lower is more conservative (default {sampling.temperature})")
    generate.add_argument("--top-k", type=_non_negative_int, default=sampling.top_k, metavar="K",
                          help=f"sample among the K most likely tokens only; 0: all (default {sampling.top_k})")
    generate.add_argument("--seed", type=_non_negative_int, default=sampling.seed, metavar="S",
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
    _add_model_source_arguments(export)
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
    import_.add_argument("--block-size", type=_positive_int, metavar="N",
                         help="the context to train and generate with (default: the checkpoint's maximum)")
    import_.add_argument("--workspace", metavar=WORKSPACE_METAVAR, help=WORKSPACE_HELP)
    import_.set_defaults(handler=commands.run_import)

    serve = subcommands.add_parser(
        "serve", help="serve every deployment (pretrain/default, sweep/default, finetune/default, evaluate/default) "
        "to a Prefect server until Ctrl-C",
        description="Serve gptflow's deployments. Start runs with `prefect deployment run 'pretrain/default'`. "
        "Needs PREFECT_API_URL pointing at a Prefect server (see `gptflow up`).",
    )
    serve.set_defaults(handler=commands.run_serve)

    workspace_help = "workspace holding the servers' databases and artifacts (default: $GPTFLOW_HOME or ./.gptflow)"
    stack_up = subcommands.add_parser("up", help="start a local Prefect server and MLflow server for this workspace")
    stack_up.add_argument("--workspace", metavar="DIR", help=workspace_help)
    stack_up.add_argument("--prefect-port", type=int, default=4200, help="Prefect server port (default 4200)")
    stack_up.add_argument("--mlflow-port", type=int, default=5000, help="MLflow server port (default 5000)")
    stack_up.set_defaults(handler=commands.run_up)
    stack_down = subcommands.add_parser("down", help="stop the servers that `gptflow up` started")
    stack_down.add_argument("--workspace", metavar="DIR", help=workspace_help)
    stack_down.set_defaults(handler=commands.run_down)

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
    train_node.add_argument("--workspace", metavar=WORKSPACE_METAVAR,
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
    return parser


def _add_pretrain_settings_arguments(parser: argparse.ArgumentParser, every_point: bool = False) -> None:
    """--corpus, --preset, --config, --set and --workspace, as pretrain and sweep take them."""
    parser.add_argument(
        "--corpus", action="append", metavar="PATH[=WEIGHT]",
        help="a file, folder or glob of .txt/.md/.py/.jsonl/.json/.parquet/.csv (gzip/zstd too), "
        "an s3://bucket/prefix/ or s3:// glob (read in place), or hf:owner/name; repeatable. "
        f"Default: {BUILTIN_CORPUS} (the Python standard library's source). "
        "A =WEIGHT suffix on every --corpus (web/=0.7 --corpus code/=0.3) trains on a data mixture: each "
        "source's share of the training windows is its share of the weights",
    )
    points = " of every point" if every_point else ""
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS),
                        help=f"named configuration{points} (default: {DEFAULT_PRESET}); see `gptflow presets`")
    parser.add_argument("--config", metavar="FILE", help="TOML or JSON file of settings, applied over the preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one setting{points}, e.g. --set train.max_steps=200; repeatable")
    parser.add_argument("--workspace", metavar=WORKSPACE_METAVAR, help=WORKSPACE_HELP)


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


def _add_model_source_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --tokenizer and --workspace: a trained model as ``tasks.model_source.resolve_model`` takes it."""
    parser.add_argument("--model", required=True, metavar="SOURCE",
                        help="models:/name/version, runs:/<run id>/model, an MLflow run id, or a directory "
                        "holding model.safetensors and config.json")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="the model's tokenizer.json, for a model directory without one beside or above it")
    parser.add_argument("--workspace", metavar=WORKSPACE_METAVAR, help=WORKSPACE_HELP)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    return _whole_number(text, minimum=0)


def _positive_int(text: str) -> int:
    return _whole_number(text, minimum=1)


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
