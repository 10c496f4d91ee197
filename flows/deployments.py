"""Every gptflow deployment, declared once: `gptflow serve` serves these, and prefect.yaml
declares the same names and entrypoints for a work pool (a test keeps the two in step)."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.exceptions import TerminationSignal
from prefect.runner import Runner
from prefect.settings import get_current_settings

from gptflow.flows.evaluate import evaluate
from gptflow.flows.finetune import finetune
from gptflow.flows.pretrain import pretrain
from gptflow.flows.stack import answers
from gptflow.flows.sweep import sweep

DEPLOYMENTS = ((pretrain, "train-gpt"), (sweep, "compare-settings"), (finetune, "tune-pretrained"),
               (evaluate, "score-model"))
"""Each flow and the name of its deployment, which says what a run of it does: runs start as
``prefect deployment run 'pretrain/train-gpt'``."""
CANCELLATION_WATCH_LOGGER = "prefect.FlowRunCancellingObserver"
"""The logger of the runner's watch for cancelled flow runs, a websocket to the Prefect server."""


def deployments() -> list[RunnerDeployment]:
    """One deployment per flow, named as ``DEPLOYMENTS`` says, with the flow's own defaults: a
    pretrain run without parameters trains on the built-in corpus with the default preset; a
    finetune run without parameters tunes the newest pretrained model on the built-in sft demo; a
    sweep run needs its ``grid`` and an evaluate run its ``model``."""
    return [
        flow.to_deployment(
            name=name,
            description=(flow.description or "").split("\n\n")[0],
            tags=["gptflow"],
            # By module, so the served runs import the installed package from any directory.
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        for flow, name in DEPLOYMENTS
    ]


def serve_deployments() -> None:
    """Serve every deployment from this process until Ctrl-C or SIGTERM."""
    # The watch logs a traceback whenever its websocket closes (the server stopped or restarted),
    # and goes on by polling: a warning of one line says as much.
    logging.getLogger(CANCELLATION_WATCH_LOGGER).addFilter(_without_traceback)
    runner = _DeploymentRunner()
    for deployment in deployments():
        runner.add_deployment(deployment)
    prefect_url = _prefect_api_url().removesuffix("/api")
    names = ", ".join(f"{flow.name}/{name}" for flow, name in DEPLOYMENTS)
    print(f"gptflow serve: serving {names} from the Prefect server at {prefect_url} until Ctrl-C. Start a run "
          f"with `prefect deployment run 'pretrain/train-gpt' --watch`, or from {prefect_url}/deployments.",
          flush=True)
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal):
        pass  # how serving is meant to end


class _DeploymentRunner(Runner):
    """Prefect's runner, which on SIGTERM pauses the deployments it serves through the Prefect
    server's API: with the server gone (``gptflow down`` before this), that retries for a minute
    and then fails with a traceback. This one stops at once then, leaving them as they are."""

    def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
        if self.pause_on_shutdown and not answers(_prefect_api_url() + "/health"):
            self.pause_on_shutdown = False
            print(f"gptflow serve: stopping; the Prefect server at {_prefect_api_url().removesuffix('/api')} no "
                  "longer answers, so its deployments stay as they were", file=sys.stderr, flush=True)
        super().handle_sigterm(*args, **kwargs)


def _without_traceback(record: logging.LogRecord) -> bool:
    """A logging filter: ``record`` with its exception's type and message in place of its traceback."""
    if record.exc_info and record.exc_info[1] is not None:
        error = record.exc_info[1]
        record.msg, record.args = f"{record.getMessage()} ({type(error).__name__}: {error})", ()
        record.exc_info, record.exc_text = None, None
    return True


def _prefect_api_url() -> str:
    return str(get_current_settings().api.url)
