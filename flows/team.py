"""The team stack's settings and secrets: PostgreSQL for both servers, logins on both, artifacts proxied.

``gptflow up --team`` keeps its secrets in ``team/secrets.json`` of the workspace (mode 0600),
generated at the first start: MLflow's admin password (never MLflow's old default), the auth
string Prefect's API asks for, the key of MLflow's sessions, and the password of the database.
They reach the servers through their environment and a 0600 configuration file, never their
command lines, so ``ps`` shows none; nothing gptflow prints or logs holds one. MLflow's users and
their permissions on experiments are MLflow's own (its basic-auth app), managed with
``gptflow user`` (``manage_user``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import secrets
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from gptflow.data.errors import UserError
from gptflow.flows.postgres import DATABASES, SUPERUSER, Database, LocalCluster, reachable, run_as

TEAM_FOLDER = "team"
SYSTEM_CLUSTERS = Path("/var/lib/gptflow/clusters")
"""Where a cluster goes that its unprivileged user could not reach in the workspace."""
ADMIN_USER = "admin"
PERMISSIONS = {"none": "NO_PERMISSIONS", "read": "READ", "edit": "EDIT", "manage": "MANAGE"}
"""What ``gptflow user grant`` takes, and MLflow's name for it."""
MLFLOW_DRIVER = "postgresql+psycopg2"
"""Named: SQLAlchemy's default PostgreSQL driver changes between its versions."""
DEFAULT_RETENTION_DAYS = 30
"""How long Prefect's server keeps finished flow runs, their logs and events (its database vacuum)."""
CREDENTIAL_CACHE_S = 60
"""How long MLflow's workers reuse a checked password (MLflow's ``auth_cache_ttl_seconds``): checking
one (scrypt) costs ~0.1 s of CPU, on every request without it, which made the MLflow API's p95 latency
seconds under bench/team_load.py's 8 clients. A removed user or changed password is refused at
most this long after, on the workers that did not make the change."""


class TeamError(UserError):
    """The team stack cannot be set up as asked; the message says what to do."""


@dataclass(frozen=True)
class TeamOptions:
    """What ``gptflow up --team`` was given."""

    database: str | None = None
    """An existing server, ``postgresql://USER@HOST:PORT`` (password in PGPASSWORD); None: a local cluster."""
    postgres_port: int = 5432
    artifacts_destination: str | None = None
    allowed_hosts: str | None = None
    retention_days: int = DEFAULT_RETENTION_DAYS
    prefect_public_url: str | None = None
    """Where browsers reach Prefect through the reverse proxy: its UI calls the API there."""


@dataclass(frozen=True)
class TeamSecrets:
    admin_password: str
    prefect_auth_string: str
    flask_secret_key: str
    database_password: str
    database: str | None = None
    """The existing server's URL (no password) the secrets were made for; None: the local cluster."""

    @classmethod
    def load_or_create(cls, workspace_root: Path, options: TeamOptions) -> TeamSecrets:
        """The workspace's secrets, generated and written with mode 0600 on the first start."""
        path = secrets_file(workspace_root)
        if path.exists():
            return cls.load(workspace_root)
        database_password = secrets.token_urlsafe(24)
        if options.database is not None:
            database_password = os.environ.get("PGPASSWORD", "")
            Database.from_url(options.database, database_password)  # refused now, before anything is written
        made = cls(admin_password=secrets.token_urlsafe(24), prefect_auth_string=f"gptflow:{secrets.token_urlsafe(24)}",
                   flask_secret_key=secrets.token_hex(32), database_password=database_password,
                   database=options.database)
        write_private(path, json.dumps(asdict(made), indent=2))
        return made

    @classmethod
    def load(cls, workspace_root: Path) -> TeamSecrets:
        path = secrets_file(workspace_root)
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as error:
            raise TeamError(f"{path} cannot be read as gptflow's team secrets ({type(error).__name__}): restore it from "
                            "a backup; without it the servers' logins and database cannot be opened.") from None

    def database_server(self, options: TeamOptions) -> Database:
        if options.database is not None and options.database != self.database:
            raise TeamError(f"This workspace's team stack keeps its data on {self.database or 'its local cluster'}, "
                            f"not {options.database}: pass the same --database, or another --workspace.")
        if self.database is not None:
            return Database.from_url(self.database, self.database_password)
        return Database("127.0.0.1", options.postgres_port, SUPERUSER, self.database_password)

    def client_environment(self) -> dict[str, str]:
        """The standard variables that log Prefect and MLflow clients in as the admin."""
        return {"PREFECT_API_AUTH_STRING": self.prefect_auth_string, "MLFLOW_TRACKING_USERNAME": ADMIN_USER,
                "MLFLOW_TRACKING_PASSWORD": self.admin_password}


def require_team_packages() -> None:
    """Refuse in one line before anything starts when the ``team`` extra is not installed."""
    import importlib.util

    missing = [name for name, module in (("psycopg2-binary", "psycopg2"), ("Flask-WTF", "flask_wtf"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise TeamError(f"The team stack needs {', '.join(missing)}: pip install 'gptflow[team]'.")


def secrets_file(workspace_root: Path) -> Path:
    return workspace_root / TEAM_FOLDER / "secrets.json"


def local_cluster(workspace_root: Path) -> LocalCluster:
    """The workspace's cluster: in its ``team/postgres/``, unless gptflow runs as root and the
    unprivileged user that runs PostgreSQL cannot reach it there (a workspace under ``/root``): then
    in ``SYSTEM_CLUSTERS``, named for the workspace. Where one was made, it stays."""
    in_workspace = LocalCluster(workspace_root / TEAM_FOLDER / "postgres")
    user = run_as()
    if user is None:
        return in_workspace
    elsewhere = LocalCluster(SYSTEM_CLUSTERS / hashlib.sha256(str(workspace_root).encode()).hexdigest()[:16])
    if elsewhere.initialised or not (in_workspace.initialised or reachable(in_workspace.folder, user)):
        return elsewhere
    return in_workspace


def write_private(path: Path, text: str) -> None:
    """Write ``path`` whole, readable by this user alone (mode 0600 from its creation on)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def check_binding(host: str, team: bool) -> None:
    """Refuse to serve anything but loopback without logins."""
    if team or _loopback(host):
        return
    raise TeamError(f"Refusing to serve on {host} without logins: anyone who reaches it could read and change every "
                    "run. Add --team (logins on, PostgreSQL), or keep the default --host 127.0.0.1.")


def prefect_environment(secrets_: TeamSecrets, database: Database, retention_days: int) -> dict[str, str]:
    """The Prefect server's settings: its database, its auth string, and a database vacuum that
    deletes flow runs (with their logs) and events older than ``retention_days``."""
    retention = str(retention_days * 86400)
    return {"PREFECT_SERVER_DATABASE_CONNECTION_URL": database.url(DATABASES["prefect"], "postgresql+asyncpg"),
            "PREFECT_SERVER_API_AUTH_STRING": secrets_.prefect_auth_string,
            "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,flow_runs",
            "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": retention,
            "PREFECT_SERVER_EVENTS_RETENTION_PERIOD": f"P{retention_days}D"}


def mlflow_server(workspace_root: Path, secrets_: TeamSecrets, database: Database, options: TeamOptions,
                  default_destination: str) -> tuple[list[str], dict[str, str]]:
    """The MLflow server's arguments (after ``mlflow server``; no secret among them) and
    environment: the basic-auth app on PostgreSQL, artifacts proxied to the destination."""
    config = workspace_root / TEAM_FOLDER / "mlflow-auth.ini"
    # New users see nothing until granted: the team's runs are not open to every account.
    write_private(config, "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                          f"database_uri = {database.url(DATABASES['mlflow_auth'], MLFLOW_DRIVER)}\nadmin_username = {ADMIN_USER}\n"
                          "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                          f"auth_cache_ttl_seconds = {CREDENTIAL_CACHE_S}\n")
    arguments = ["--app-name", "basic-auth", "--serve-artifacts",
                 "--artifacts-destination", options.artifacts_destination or default_destination]
    if options.allowed_hosts:
        arguments += ["--allowed-hosts", options.allowed_hosts]
    environment = {"MLFLOW_BACKEND_STORE_URI": database.url(DATABASES["mlflow"], MLFLOW_DRIVER),
                   "MLFLOW_AUTH_CONFIG_PATH": str(config),
                   "MLFLOW_AUTH_ADMIN_PASSWORD": secrets_.admin_password,  # read on the first start alone
                   "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets_.flask_secret_key}
    return arguments, environment


def manage_user(tracking_uri: str, action: str, username: str, password: str | None = None,
                permission: str | None = None, experiments: list[str] | None = None) -> str:
    """Add or remove an MLflow user, or grant one ``permission`` on experiments (by name; default
    gptflow's own, and then on every registered model too); as the logged-in admin. Returns what
    was done, in a line."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    with warnings.catch_warnings():  # it imports MLflow's server, which warns of Starlette's deprecations
        warnings.simplefilter("ignore")
        from mlflow.server.auth.client import AuthServiceClient

    from gptflow.tasks.tracking.experiments import WORKFLOWS, experiment_name

    client = AuthServiceClient(tracking_uri)
    try:
        if action == "add":
            if _user_exists(client, username):
                raise TeamError(f"The user {username} exists already: `gptflow user remove {username}` first to "
                                "make them anew.")
            client.create_user(username, password)
            return f"added {username}; they see nothing until granted (gptflow user grant {username} edit)"
        if action == "remove":
            client.delete_user(username)
            return (f"removed {username}; the MLflow server refuses their password within {CREDENTIAL_CACHE_S} s "
                    "(its workers cache a checked password that long)")
        level = PERMISSIONS[permission]
        names = experiments or [experiment_name(workflow) for workflow in WORKFLOWS]
        tracking = MlflowClient(tracking_uri)
        for name in names:
            experiment = tracking.get_experiment_by_name(name)
            if experiment is None:
                raise TeamError(f"No experiment {name!r} on {tracking_uri}: check its name in the MLflow UI.")
            _grant(client, username, "experiment", experiment.experiment_id, level)
        if not experiments:  # the whole of gptflow: the models it registers too
            _grant(client, username, "registered_model", "*", level)
        return f"{username} may now {permission} {', '.join(names)}" + ("" if experiments else " and every model")
    except MlflowException as error:
        raise TeamError(f"MLflow at {tracking_uri} refused to {action} {username}: {error.message.splitlines()[0]} "
                        "(run this as the admin: on the server, or after `gptflow login --username admin`).") from None


def _user_exists(client, username: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_user(username)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def _grant(client, username: str, resource_type: str, resource_id: str, level: str) -> None:
    if level == "NO_PERMISSIONS":
        client.revoke_user_permission(username, resource_type, resource_id)
    else:
        client.grant_user_permission(username, resource_type, resource_id, level)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
