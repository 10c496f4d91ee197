"""Every gptflow deployment, declared once: `gptflow serve` serves these, and prefect.yaml
declares the same names and entrypoints for a work pool (a test keeps the two in step)."""

from __future__ import annotations

from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from gptflow.flows.evaluate import evaluate
from gptflow.flows.finetune import finetune
from gptflow.flows.pretrain import pretrain
from gptflow.flows.sweep import sweep

DEPLOYMENT_NAME = "default"
FLOWS = (pretrain, sweep, finetune, evaluate)


def deployments() -> list[RunnerDeployment]:
    """One deployment per flow, with the flow's own defaults: a pretrain run without parameters
    trains on the built-in corpus with the default preset; a finetune run without parameters
    tunes the newest pretrained model on the built-in sft demo; a sweep run needs its
    ``grid`` and an evaluate run its ``model``."""
    return [
        flow.to_deployment(
            name=DEPLOYMENT_NAME,
            description=(flow.description or "").split("\n\n")[0],
            tags=["gptflow"],
            # By module, so the served runs import the installed package from any directory.
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        for flow in FLOWS
    ]


def serve_deployments() -> None:
    """Serve every deployment from this process until interrupted (Ctrl-C)."""
    serve(*deployments())
