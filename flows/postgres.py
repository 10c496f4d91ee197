"""PostgreSQL for the team stack: a cluster gptflow initialises in the workspace, or a server the team runs.

The local cluster lives in ``team/postgres/`` of the workspace (``flows.team.local_cluster`` says
where else as root), listens on 127.0.0.1 alone (no Unix socket) and asks every client for a
password (scram-sha-256). PostgreSQL refuses to run as
root, so when gptflow runs as root, the cluster's folder belongs to an unprivileged OS user
(``postgres`` where Debian's package made it, else ``nobody``), which runs ``initdb`` and the
server. Prefect, MLflow and MLflow's user store each get a database of their own on it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from gptflow.data.errors import UserError

DATABASES = {"prefect": "gptflow_prefect", "mlflow": "gptflow_mlflow", "mlflow_auth": "gptflow_mlflow_auth"}
"""What each server keeps on PostgreSQL: its database's name."""
SUPERUSER = "gptflow"
"""The role ``initdb`` makes in a local cluster, owner of its databases."""
UNPRIVILEGED_USERS = ("postgres", "nobody")
"""Who runs a local cluster when gptflow runs as root: the first that exists."""
CONNECT_TIMEOUT_S = 60.0


class DatabaseError(UserError):
    """PostgreSQL cannot be set up or reached; the message says what to do."""


@dataclass(frozen=True)
class Database:
    """A PostgreSQL server and the role gptflow logs in as; the password is never in ``url``."""

    host: str
    port: int
    user: str
    password: str

    @classmethod
    def from_url(cls, url: str, password: str | None) -> Database:
        """The server of a ``postgresql://user@host:port`` URL, whose password comes from
        ``password`` (``PGPASSWORD``): a password in the URL would show in ``ps``, so it is refused."""
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres") or not parts.hostname or not parts.username:
            raise DatabaseError(f"--database {url!r} is not a PostgreSQL server URL: pass "
                                "postgresql://USER@HOST:PORT (the password in PGPASSWORD).")
        if parts.password is not None:
            raise DatabaseError("--database holds a password, which any user of this machine would see in `ps`: pass "
                                "postgresql://USER@HOST:PORT and the password in the PGPASSWORD variable.")
        if not password:
            raise DatabaseError(f"No password for {parts.username} on {parts.hostname}: set PGPASSWORD.")
        return cls(parts.hostname, parts.port or 5432, parts.username, password)

    def url(self, database: str, driver: str = "postgresql") -> str:
        """The SQLAlchemy URL of ``database`` with the password: for environments and 0600 files only."""
        return (f"{driver}://{quote(self.user, safe='')}:{quote(self.password, safe='')}@{self.host}:{self.port}/"
                f"{database}")

    def create_databases(self) -> None:
        """Create gptflow's databases that do not exist yet, waiting up to ``CONNECT_TIMEOUT_S`` for
        a server that is still starting."""
        import psycopg2

        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            try:
                connection = psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                              dbname="postgres", connect_timeout=5)
                break
            except psycopg2.OperationalError as error:
                if "password authentication failed" in str(error):
                    raise DatabaseError(f"PostgreSQL at {self.host}:{self.port} refused the password of "
                                        f"{self.user}: set the right one in PGPASSWORD.") from None
                if time.monotonic() > deadline:
                    raise DatabaseError(f"PostgreSQL at {self.host}:{self.port} did not accept a connection within "
                                        f"{CONNECT_TIMEOUT_S:.0f} s: {str(error).strip()}") from None
                time.sleep(0.5)
        connection.autocommit = True  # CREATE DATABASE runs outside a transaction
        try:
            with connection.cursor() as cursor:
                for name in DATABASES.values():
                    cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                    if cursor.fetchone() is None:
                        cursor.execute(f'CREATE DATABASE "{name}"')
        except psycopg2.Error as error:
            raise DatabaseError(f"PostgreSQL at {self.host}:{self.port} refused to create gptflow's databases "
                                f"({', '.join(DATABASES.values())}) for {self.user}: {str(error).strip()}. Create them, "
                                "owned by that role, or give it CREATEDB.") from None
        finally:
            connection.close()


class LocalCluster:
    """The PostgreSQL cluster of a workspace, in ``folder`` (its data in ``folder/data``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data = folder / "data"

    @property
    def initialised(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def initialise(self, password: str) -> None:
        """``initdb`` with ``SUPERUSER`` and ``password``, as ``run_as()``; the password passes
        through a file of that user's, mode 0600, removed at once."""
        user = run_as()
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        if user is not None:
            _check_reachable(self.folder, user)
            os.chown(self.folder, user.pw_uid, user.pw_gid)
        password_file = self.folder / "initdb-password"
        descriptor = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(password + "\n")
        if user is not None:
            os.chown(password_file, user.pw_uid, user.pw_gid)
        try:
            result = subprocess.run(
                [binary("initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth=scram-sha-256",
                 f"--pwfile={password_file}", "--encoding=UTF8", "--no-locale", "--no-instructions"],
                capture_output=True, text=True, **_as_user(user))
        finally:
            password_file.unlink(missing_ok=True)
        if result.returncode != 0:
            shutil.rmtree(self.data, ignore_errors=True)
            raise DatabaseError(f"initdb failed for {self.data}: {result.stderr.strip().splitlines()[-1:]}")

    def server_command(self, port: int) -> tuple[list[str], dict]:
        """The command that runs the cluster's server on 127.0.0.1:``port``, and the ``Popen``
        options that run it as ``run_as()``."""
        command = [binary("postgres"), "-D", str(self.data), "-c", "listen_addresses=127.0.0.1", "-c", f"port={port}",
                   "-c", "unix_socket_directories="]
        return command, _as_user(run_as())


def binary(name: str) -> str:
    """A PostgreSQL server program: on PATH, else the newest of Debian's ``/usr/lib/postgresql/*/bin``."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                                                   key=_major_version, reverse=True)), None)
    if found is None:
        raise DatabaseError(f"PostgreSQL's `{name}` is not installed: install PostgreSQL (Debian, Ubuntu: "
                            "apt-get install postgresql), or pass an existing server with --database postgresql://...")
    return found


def run_as() -> pwd.struct_passwd | None:
    """The unprivileged user a local cluster runs as when gptflow runs as root; None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in UNPRIVILEGED_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise DatabaseError("PostgreSQL refuses to run as root and this machine has no `postgres` or `nobody` user: "
                        "create one (useradd postgres), or run gptflow as an unprivileged user.")


def port_in_use(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _as_user(user: pwd.struct_passwd | None) -> dict:
    return {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def reachable(folder: Path, user: pwd.struct_passwd) -> bool:
    """Whether ``user`` can reach ``folder``: no folder above it that exists shuts others out."""
    return _shut_folder(folder, user) is None


def _shut_folder(folder: Path, user: pwd.struct_passwd) -> Path | None:
    for parent in folder.resolve().parents:
        if not parent.exists():
            continue
        mode = parent.stat()
        if mode.st_uid != user.pw_uid and not mode.st_mode & stat.S_IXOTH:
            return parent
    return None


def _check_reachable(folder: Path, user: pwd.struct_passwd) -> None:
    """Refuse a cluster folder that ``user`` cannot reach: every folder above it must let others
    (or that user) pass."""
    shut = _shut_folder(folder, user)
    if shut is not None:
        raise DatabaseError(f"PostgreSQL runs as the user {user.pw_name}, which cannot reach {folder} ({shut} "
                            f"lets no other user in): `chmod o+x {shut}`, put the workspace elsewhere, or pass "
                            "an existing server with --database postgresql://...")


def _major_version(path: str) -> int:
    version = Path(path).parent.parent.name
    return int(version) if version.isdigit() else 0
