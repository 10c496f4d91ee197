"""The team stack's refusals and its parts that need no running servers: binding, the database, the login file."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from gptflow.flows.login import LOGIN_FILE_ENV, Login, apply_login, login_file
from gptflow.flows.postgres import DATABASES, Database, DatabaseError, LocalCluster
from gptflow.flows.team import (
    SYSTEM_CLUSTERS,
    TeamError,
    TeamOptions,
    TeamSecrets,
    check_binding,
    local_cluster,
    secrets_file,
    write_private,
)

ROOT = Path(__file__).resolve().parents[2]


def _gptflow(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptflow.flows.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env or dict(os.environ), timeout=120)


def test_serving_beyond_loopback_without_logins_is_refused_in_one_line(tmp_path):
    result = _gptflow("up", "--workspace", str(tmp_path / "ws"), "--host", "0.0.0.0")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "gptflow: error: Refusing to serve on 0.0.0.0 without logins: anyone who reaches it could read and change "
        "every run. Add --team (logins on, PostgreSQL), or keep the default --host 127.0.0.1."]
    assert not (tmp_path / "ws" / "stack.json").exists() and not (tmp_path / "ws" / "logs").exists()
    for loopback in ("127.0.0.1", "::1", "localhost"):
        check_binding(loopback, team=False)
    check_binding("10.0.0.5", team=True)
    with pytest.raises(TeamError):
        check_binding("10.0.0.5", team=False)


def test_a_database_password_on_the_command_line_is_refused_in_one_line(tmp_path):
    result = _gptflow("up", "--team", "--workspace", str(tmp_path / "ws"), "--database",
                      "postgresql://gptflow:hunter2@db.example:5432")
    assert result.returncode == 2
    assert result.stderr.startswith("gptflow: error: --database holds a password, which any user of this machine "
                                    "would see in `ps`") and len(result.stderr.splitlines()) == 1
    assert not secrets_file(tmp_path / "ws").exists()  # nothing half made


@pytest.mark.slow  # starts PostgreSQL
def test_an_existing_server_gets_gptflow_s_databases_once(postgresql, monkeypatch, tmp_path):
    import psycopg2

    url = f"postgresql://{postgresql['user']}@{postgresql['host']}:{postgresql['port']}"
    monkeypatch.setenv("PGPASSWORD", postgresql["password"])
    options = TeamOptions(database=url)
    made = TeamSecrets.load_or_create(tmp_path, options)
    assert stat.S_IMODE(secrets_file(tmp_path).stat().st_mode) == 0o600
    assert TeamSecrets.load_or_create(tmp_path, options) == made  # generated once, then kept
    database = made.database_server(options)
    database.create_databases()
    database.create_databases()  # a second start finds them
    with psycopg2.connect(host=database.host, port=database.port, user=database.user, password=database.password,
                          dbname="postgres") as connection, connection.cursor() as cursor:
        cursor.execute("SELECT datname FROM pg_database")
        assert set(DATABASES.values()) <= {row[0] for row in cursor.fetchall()}
    with pytest.raises(TeamError, match="keeps its data on postgresql://"):
        made.database_server(TeamOptions(database="postgresql://other@db.example:5432"))
    wrong = Database(database.host, database.port, database.user, "not-the-password")
    with pytest.raises(DatabaseError, match="refused the password of tester: set the right one in PGPASSWORD"):
        wrong.create_databases()


@pytest.mark.skipif(os.geteuid() != 0, reason="a cluster runs as another user only when gptflow runs as root")
def test_a_cluster_folder_its_unprivileged_user_cannot_reach_is_refused_in_one_line(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    cluster = LocalCluster(private / "team" / "postgres")
    with pytest.raises(DatabaseError, match=rf"cannot reach {cluster.folder} \({private} lets no other user in\): "
                                            rf"`chmod o\+x {private}`"):
        cluster.initialise("a-password")
    assert not cluster.initialised


@pytest.mark.skipif(os.geteuid() != 0, reason="a cluster runs as another user only when gptflow runs as root")
def test_a_cluster_goes_where_its_unprivileged_user_reaches_it(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)  # as /root is
    elsewhere = local_cluster(private / "ws")
    assert elsewhere.folder.parent == SYSTEM_CLUSTERS and not elsewhere.initialised
    assert local_cluster(private / "ws").folder == elsewhere.folder  # the same workspace, the same cluster
    assert local_cluster(private / "other").folder != elsewhere.folder
    shared = Path(tempfile.mkdtemp(prefix="gptflow-team-reach-", dir="/tmp"))
    try:
        shared.chmod(0o711)
        assert local_cluster(shared / "ws").folder == shared / "ws" / "team" / "postgres"
    finally:
        shutil.rmtree(shared)


def test_a_kept_login_fills_in_only_what_the_environment_does_not_name(tmp_path, monkeypatch):
    monkeypatch.setenv(LOGIN_FILE_ENV, str(tmp_path / "login.json"))
    for name in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    login = Login("http://team:4200/api", "gptflow:s3cret", "http://team:5000", "alice", "pw")
    write_private(login_file(), json.dumps(login.__dict__))
    assert stat.S_IMODE(login_file().stat().st_mode) == 0o600
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")  # another server: its own variables
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "from-the-environment")
    apply_login()
    assert os.environ["PREFECT_API_URL"] == "http://team:4200/api"
    assert os.environ["PREFECT_API_AUTH_STRING"] == "gptflow:s3cret"
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://elsewhere:5000"
    assert "MLFLOW_TRACKING_USERNAME" not in os.environ
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "from-the-environment"
