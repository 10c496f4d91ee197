"""Logging in to a team stack: ``gptflow login`` once, then every command uses the credentials.

``gptflow login`` checks the credentials against both servers, then keeps them, readable by this
user alone (mode 0600), in ``~/.config/gptflow/login.json`` (``$GPTFLOW_LOGIN_FILE``), and the
Prefect ones in the current Prefect profile too, so that ``prefect deployment run`` uses them.
Every ``gptflow`` command reads the file into the standard variables (``PREFECT_API_URL``,
``PREFECT_API_AUTH_STRING``, ``MLFLOW_TRACKING_URI``, ``MLFLOW_TRACKING_USERNAME``,
``MLFLOW_TRACKING_PASSWORD``); variables set in the environment win. Before a flow starts,
``check_credentials`` asks both servers once, so that wrong or missing credentials are one line
naming the fix, not a traceback from inside a run.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from gptflow.data.errors import UserError
from gptflow.flows.team import write_private

LOGIN_FILE_ENV = "GPTFLOW_LOGIN_FILE"


class LoginError(UserError):
    """A server refused the credentials given or kept; the message names the fix."""


@dataclass(frozen=True)
class Login:
    prefect_api_url: str
    prefect_auth_string: str
    mlflow_tracking_uri: str
    username: str
    password: str

    def environment(self) -> dict[str, str]:
        return {"PREFECT_API_URL": self.prefect_api_url, "PREFECT_API_AUTH_STRING": self.prefect_auth_string,
                "MLFLOW_TRACKING_URI": self.mlflow_tracking_uri, "MLFLOW_TRACKING_USERNAME": self.username,
                "MLFLOW_TRACKING_PASSWORD": self.password}


def login_file() -> Path:
    configured = os.environ.get(LOGIN_FILE_ENV)
    if configured:
        return Path(configured).expanduser()
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config_home / "gptflow" / "login.json"


def log_in(login: Login) -> Path:
    """Check ``login`` against both servers, then keep it (mode 0600) and put its Prefect server
    and auth string in the current Prefect profile; the file it went to."""
    check_credentials(login.environment())
    path = login_file()
    write_private(path, json.dumps(asdict(login), indent=2))
    _keep_in_prefect_profile(login)
    return path


def apply_login() -> None:
    """Take the kept login's credentials for each server that the environment does not name, or
    names as the login does: a server set in the environment is used with its own variables."""
    path = login_file()
    if not path.exists():
        return
    try:
        login = Login(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as error:
        raise LoginError(f"{path} is not a login gptflow wrote ({type(error).__name__}): run `gptflow login` "
                         "again.") from None
    environment = login.environment()
    for server, names in (("PREFECT_API_URL", ("PREFECT_API_AUTH_STRING",)),
                          ("MLFLOW_TRACKING_URI", ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"))):
        if os.environ.get(server, environment[server]) == environment[server]:
            os.environ[server] = environment[server]
            for name in names:
                os.environ.setdefault(name, environment[name])


def check_credentials(environment: dict[str, str]) -> None:
    """Ask the Prefect API and the MLflow server of ``environment`` (the standard variables) for
    something only a logged-in client gets; ``LoginError`` in one line when either refuses."""
    prefect = environment.get("PREFECT_API_URL")
    if prefect:
        auth = environment.get("PREFECT_API_AUTH_STRING")
        status = _status(f"{prefect.rstrip('/')}/flows/filter", auth, body=b"{}")
        if status == 401:
            raise LoginError(f"The Prefect server {prefect} refused {'this' if auth else 'a missing'} auth string: run "
                             "`gptflow login` (or set PREFECT_API_AUTH_STRING) with the one its admin gave you.")
    mlflow = environment.get("MLFLOW_TRACKING_URI", "")
    if mlflow.startswith("http"):
        username, password = environment.get("MLFLOW_TRACKING_USERNAME"), environment.get("MLFLOW_TRACKING_PASSWORD")
        credentials = f"{username}:{password}" if username and password else None
        status = _status(f"{mlflow.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1", credentials)
        if status == 401:
            who = f"the password of {username}" if credentials else "a request without a user name and password"
            raise LoginError(f"The MLflow server {mlflow} refused {who}: run `gptflow login --username NAME` (or set "
                             "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD) with the account its admin made.")


def _status(url: str, credentials: str | None, body: bytes | None = None) -> int | None:
    """The HTTP status of a request to ``url`` with basic auth ``credentials``; None when nothing
    answers (the commands say that in their own words)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    if credentials:
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return None


def _keep_in_prefect_profile(login: Login) -> None:
    """The Prefect CLI reads its profile, not gptflow's file: keep the server and auth string
    there, in a profiles file only this user reads."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, PREFECT_PROFILES_PATH, update_current_profile

    mask = os.umask(0o077)  # a profiles file Prefect creates now is never readable by others, even for a moment
    try:
        update_current_profile({PREFECT_API_URL: login.prefect_api_url,
                                PREFECT_API_AUTH_STRING: login.prefect_auth_string})
    finally:
        os.umask(mask)
    os.chmod(PREFECT_PROFILES_PATH.value(), 0o600)
