"""The cluster examples in examples/ name commands and flags gptflow takes: each command is read
from the file and parsed by the command line's own parser, so renaming a flag fails here."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
import yaml

from gptflow.flows.cli import build_parser
from gptflow.tasks.settings import PRESETS

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "examples" / "slurm" / "pretrain.sbatch"
KUBERNETES = ROOT / "examples" / "kubernetes" / "pytorchjob.yaml"
SLURM_JOB = {"SLURM_JOB_NUM_NODES": "2", "HEAD_NODE": "node0"}
"""What Slurm and the script's own $(scontrol ...) give the variables the commands use."""


def _strict_parser() -> argparse.ArgumentParser:
    """The command line's parser, refusing abbreviated flags: a flag renamed in the CLI must not
    still match the example's old name as a prefix of the new one."""
    parser = build_parser()
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subcommand in action.choices.values():
                subcommand.allow_abbrev = False
    return parser


def _slurm_commands() -> dict[str, list[str]]:
    """Each `gptflow` command of the batch script (continuation lines joined), its variables expanded
    as the script sets them, by subcommand."""
    script = SLURM.read_text()
    values = {**dict(re.findall(r"^export (\w+)=(\S+)$", script, re.MULTILINE)), **SLURM_JOB}
    joined = re.sub(r"\\\n\s*", " ", script)
    commands = {}
    for line in joined.splitlines():
        if line.strip().startswith("gptflow "):
            expanded = re.sub(r"\$\{?(\w+)\}?", lambda match: values[match[1]], line)
            argv = shlex.split(expanded)[1:]
            commands[argv[0]] = argv
    return commands


def _kubernetes_commands() -> dict[str, list[str]]:
    job = yaml.safe_load(KUBERNETES.read_text())
    commands = {}
    for role, replicas in job["spec"]["pytorchReplicaSpecs"].items():
        (container,) = replicas["template"]["spec"]["containers"]
        assert container["command"][0] == "gptflow", role
        commands[role] = [str(argument) for argument in container["command"][1:]]
    return commands


def _check_head_and_other_nodes(head: list[str], other: list[str], nodes: int) -> None:
    head_args, other_args = _strict_parser().parse_args(head), _strict_parser().parse_args(other)
    assert (head_args.command, other_args.command) == ("pretrain", "train-node")
    assert head_args.preset in PRESETS
    for args in (head_args, other_args):
        assert args.nnodes == nodes and args.nproc_per_node >= 1
        assert re.fullmatch(r"[\w.-]+:\d+", args.rdzv_endpoint)
    # The nodes meet at one place, with one shape, on one workspace.
    for flag in ("nnodes", "nproc_per_node", "rdzv_endpoint", "workspace"):
        assert getattr(head_args, flag) == getattr(other_args, flag), flag


def test_the_slurm_script_runs_pretrain_on_the_first_node_and_train_node_on_the_others():
    commands = _slurm_commands()
    assert set(commands) == {"pretrain", "train-node"}
    _check_head_and_other_nodes(commands["pretrain"], commands["train-node"], nodes=2)
    script = SLURM.read_text()
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert re.search(r"^srun .*bash -c run_node$", script, re.MULTILINE)
    assert "--rdzv-endpoint \"$HEAD_NODE:$RDZV_PORT\"" in script


def test_the_pytorchjob_runs_pretrain_on_the_master_and_train_node_on_the_workers():
    job = yaml.safe_load(KUBERNETES.read_text())
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert replicas["Master"]["replicas"] == 1
    commands = _kubernetes_commands()
    nodes = 1 + replicas["Worker"]["replicas"]
    _check_head_and_other_nodes(commands["Master"], commands["Worker"], nodes=nodes)
    # The operator names the Master pod <job>-master-0 in the cluster's DNS.
    endpoint = _strict_parser().parse_args(commands["Master"]).rdzv_endpoint
    assert endpoint.split(":")[0] == f"{job['metadata']['name']}-master-0"


@pytest.mark.parametrize(("name", "other_name"), [("--rdzv-endpoint", "--rdzv"), ("--nproc-per-node", "--gpus")])
def test_a_flag_the_command_line_does_not_take_as_written_is_refused(name, other_name):
    head = [other_name if argument == name else argument for argument in _slurm_commands()["pretrain"]]
    with pytest.raises(SystemExit):
        _strict_parser().parse_args(head)
