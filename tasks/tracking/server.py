"""Whether an MLflow error means the tracking server cannot be reached, or refuses this user."""

from __future__ import annotations

import requests


def server_unreachable(error: BaseException) -> bool:
    """Whether ``error``, or one it was raised from, says the tracking server cannot be reached:
    refused or dropped connections, answers cut off by a server that died mid-reply, timeouts,
    answers still 5xx after MLflow's retries. Errors
    that are the caller's fault (a rejected request, a bad certificate) are not."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, requests.exceptions.SSLError):
            return False
        if isinstance(cause, (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError,
                              requests.exceptions.Timeout, requests.exceptions.RetryError)):
            return True
        # MLflow raises its own exception while handling the requests one, without "from".
        cause = cause.__cause__ or cause.__context__
    return False


def permission_denied(error: BaseException) -> bool:
    """Whether ``error`` is a tracking server with logins refusing the logged-in user (HTTP 403)."""
    return getattr(error, "error_code", None) == "PERMISSION_DENIED" or "error code 403" in str(error)
