"""Bad input is reported as one clear line, not as a traceback from deep inside Prefect."""

from __future__ import annotations

import logging

from gptflow.data.errors import UserError

# The loggers through which Prefect's engines report a task's or a flow's exception.
ENGINE_LOGGERS = ("prefect.task_runs", "prefect.flow_runs", "prefect.task_engine", "prefect.flow_engine")


class _DropUserErrorTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info = None
            record.exc_text = None
        return True


_FILTER = _DropUserErrorTracebacks()


def hide_tracebacks_of_user_errors() -> None:
    """Keep the one-line message Prefect logs for a user error, drop its traceback (idempotent)."""
    for name in ENGINE_LOGGERS:
        logging.getLogger(name).addFilter(_FILTER)
