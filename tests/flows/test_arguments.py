"""A flow's command-line options are read from the flow's own signature and docstring."""

from __future__ import annotations

import argparse
import inspect

import pytest

from gptflow.flows.cli import build_parser
from gptflow.flows.evaluate import evaluate
from gptflow.flows.finetune import finetune
from gptflow.flows.pretrain import pretrain
from gptflow.flows.sweep import sweep

FLOWS = {"pretrain": pretrain, "sweep": sweep, "finetune": finetune, "evaluate": evaluate}
SET_BY_GPTFLOW = {"pretrain": {"rendezvous", "sweep"}}
"""Parameters no user gives: the command line fills them from other options (--nnodes, ...), the
sweep flow for each point; neither a deployment's run form nor the command line offers them."""
READ_AS_TEXT = {"overrides", "grid", "lm_eval"}
"""Parameters the command line reads as text and its command turns into the flow's value."""
REQUIRED = {"evaluate": ["--model", "m"]}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [subparsers] = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return subparsers.choices


@pytest.mark.parametrize("name", FLOWS)
def test_each_flow_parameter_is_an_option_with_the_flows_default_and_its_docstring_entry_as_help(name):
    parameters = inspect.signature(FLOWS[name].fn).parameters
    # The parameter schema of the flow's deployments: what their run form offers.
    described = FLOWS[name].parameters.model_dump()["properties"]
    assert set(described) == set(parameters) - SET_BY_GPTFLOW.get(name, set())
    args = build_parser().parse_args([name, *REQUIRED.get(name, [])])
    assert set(args.flow_parameters) == set(described)
    for parameter in args.flow_parameters:
        default = parameters[parameter].default
        if parameter not in READ_AS_TEXT and default is not inspect.Parameter.empty:
            assert getattr(args, parameter) == default, parameter
    # Prefect's UI describes each parameter with the same docstring entry.
    options = {action.dest: action for action in _subparsers(build_parser())[name]._actions}
    for parameter in args.flow_parameters:
        assert options[parameter].help.split()[:2] == described[parameter]["description"].split()[:2], parameter


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    for name, command in _subparsers(parser).items():
        for action in command._actions:
            assert action.help and action.help.strip(), f"gptflow {name} {action.option_strings}"


def test_a_flows_parameters_are_named_by_their_flags_and_defaults_are_stated():
    sweep_help = _subparsers(build_parser())["sweep"].format_help()
    assert "a larger --random adds points" in " ".join(sweep_help.split())
    assert "(default: 1)" in sweep_help and "(default: 0)" in sweep_help and "(default: cpu)" in sweep_help


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["sweep", "--random", "0"], "argument --random: must be >= 1, got 0"),
        (["sweep", "--max-parallel", "two"], "argument --max-parallel: expected a whole number, got 'two'"),
        (["sweep", "--compute-budget", "0"], "argument --compute-budget: must be > 0, got 0"),
        (["evaluate", "--model", "m", "--num-fewshot", "-1"], "argument --num-fewshot: must be >= 0, got -1"),
        (["evaluate", "--model", "m", "--split", "test"], "argument --split: invalid choice: 'test'"),
    ],
)
def test_bounds_and_choices_of_a_flows_signature_are_checked_by_the_command_line(capsys, arguments, message):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(arguments)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_prefect_checks_the_same_bounds_for_a_deployments_parameters():
    properties = sweep.parameters.model_dump()["properties"]
    assert properties["max_parallel"]["minimum"] == 1
    assert properties["compute_budget"]["anyOf"][0]["exclusiveMinimum"] == 0
