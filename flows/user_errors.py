"""Bad input, and a disk that ran out of space, are reported as one clear line, not as a traceback
from deep inside Prefect."""

from __future__ import annotations

import logging
from pathlib import Path

from gptflow.data.disk_space import (
    OutOfSpaceError,
    exception_chain,
    failed_write_path,
    out_of_space_errno,
    out_of_space_error,
)
from gptflow.data.errors import UserError

# The loggers through which Prefect's engines report a task's or a flow's exception.
ENGINE_LOGGERS = ("prefect.task_runs", "prefect.flow_runs", "prefect.task_engine", "prefect.flow_engine")


def user_error(error: Exception, workspace: Path) -> Exception | None:
    """What the CLI prints for ``error`` as one line, or None for a bug: ``error`` itself when it is
    a user error; the ``OutOfSpaceError`` of a stage that ran out of space when a later error (such
    as marking the MLflow run failed on the full disk) hides it; an ``OutOfSpaceError`` naming
    ``workspace`` for any other write that ran out of space (the MLflow store, a lineage file)."""
    if isinstance(error, (UserError, OutOfSpaceError)):
        return error
    reported = next((link for link in exception_chain(error) if isinstance(link, OutOfSpaceError)), None)
    return reported or out_of_space_error(error, failed_write_path(error) or workspace)


def one_line(error: BaseException, reported: BaseException) -> str:
    """``reported`` (``user_error`` of ``error``) with the notes that ``error``, or an error it was
    raised from or while handling, carries: what the run's tracking could not write
    (``tasks.tracking.run.pipeline_run``)."""
    notes = [note for link in (reported, *exception_chain(error)) for note in getattr(link, "__notes__", [])]
    return " ".join([str(reported), *dict.fromkeys(notes)])


class _DropUserErrorTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, UserError) or out_of_space_errno(error) is not None:
            record.exc_info = None
            record.exc_text = None
            message = record.getMessage()
            # Prefect's line on a result record it could not write does not say why: the traceback did.
            if repr(error) not in message and str(error) not in message:
                record.msg, record.args = f"{message}: {error}", None
        return True


class _DropOutOfSpaceStoreErrors(logging.Filter):
    """MLflow's SQL store logs the traceback of every database error before it raises it; one of a
    full disk is reported by gptflow in one line (the stage's, or the run's end kept in its outbox)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return out_of_space_errno(record.exc_info[1] if record.exc_info else None) is None


_FILTER = _DropUserErrorTracebacks()
_STORE_FILTER = _DropOutOfSpaceStoreErrors()
# The logger through which MLflow's SQL store reports a database error, with its traceback.
MLFLOW_STORE_LOGGER = "mlflow.store.db.utils"


def hide_tracebacks_of_user_errors() -> None:
    """Keep the one-line message Prefect logs for a user error, drop its traceback, and drop MLflow's
    store's report of a full disk (idempotent)."""
    for name in ENGINE_LOGGERS:
        logging.getLogger(name).addFilter(_FILTER)
    logging.getLogger(MLFLOW_STORE_LOGGER).addFilter(_STORE_FILTER)
