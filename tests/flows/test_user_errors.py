"""What the CLI prints as one line, and the tracebacks Prefect's log keeps."""

from __future__ import annotations

import errno
import logging

from gptflow.data.disk_space import OutOfSpaceError
from gptflow.data.errors import CorpusError
from gptflow.flows.user_errors import MLFLOW_STORE_LOGGER, hide_tracebacks_of_user_errors, one_line, user_error


def _raised_while_handling(first: Exception, second: Exception) -> Exception:
    try:
        try:
            raise first
        except Exception:
            raise second  # as a failure recorded on the same full disk would
    except Exception as raised:
        return raised


def test_user_errors_and_writes_that_ran_out_of_space_are_one_line_and_bugs_are_not(tmp_path):
    corpus_error = CorpusError("no documents")
    assert user_error(corpus_error, tmp_path) is corpus_error
    assert user_error(KeyError("bug"), tmp_path) is None
    # Outside any stage (here the MLflow store): named by the workspace.
    sqlite_full = Exception("(sqlite3.OperationalError) database or disk is full")
    assert str(user_error(sqlite_full, tmp_path)).startswith(f"out of space writing {tmp_path}: the disk is full")
    # A stage's error, hidden by one raised while the failure was recorded on the same full disk.
    stage_error = OutOfSpaceError("stage pretrain-model: out of space writing x", errno.ENOSPC)
    assert user_error(_raised_while_handling(stage_error, sqlite_full), tmp_path) is stage_error


def _log_with_traceback(logger: logging.Logger, message: str, error: Exception) -> None:
    try:
        raise error
    except Exception:
        logger.error(message, exc_info=True)


def test_prefect_logs_a_user_error_or_a_full_disk_in_one_line(caplog):
    hide_tracebacks_of_user_errors()
    logger = logging.getLogger("prefect.task_runs")
    with caplog.at_level(logging.ERROR, logger="prefect.task_runs"):
        _log_with_traceback(logger, "Task run failed with exception: %r", CorpusError("no documents"))
        _log_with_traceback(logger, "An error was encountered while committing transaction 'key'",
                            OSError(errno.ENOSPC, "No space left on device"))
        _log_with_traceback(logger, "Task run failed with exception", KeyError("bug"))
    user, disk_full, bug = caplog.records
    assert user.exc_info is None and disk_full.exc_info is None and bug.exc_info is not None
    assert disk_full.getMessage() == (
        "An error was encountered while committing transaction 'key': [Errno 28] No space left on device")


def test_the_line_carries_the_notes_of_what_tracking_could_not_write(tmp_path):
    stage_error = OutOfSpaceError("stage tokenize-corpus: out of space writing x", errno.ENOSPC)
    stage_error.__notes__ = ["MLflow run r1 is left RUNNING."]
    assert one_line(stage_error, user_error(stage_error, tmp_path)) == (
        "stage tokenize-corpus: out of space writing x MLflow run r1 is left RUNNING.")


def test_mlflow_s_store_reports_a_full_disk_through_gptflow_alone(caplog):
    hide_tracebacks_of_user_errors()
    logger = logging.getLogger(MLFLOW_STORE_LOGGER)
    with caplog.at_level(logging.ERROR, logger=MLFLOW_STORE_LOGGER):
        for cause in ("database or disk is full", "database is locked"):
            _log_with_traceback(logger, "SQLAlchemy database error", Exception(f"(sqlite3.OperationalError) {cause}"))
    [kept] = caplog.records
    assert "locked" in str(kept.exc_info[1])
