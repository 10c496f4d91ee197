"""`gptflow up --team` on real servers: PostgreSQL (a local cluster), Prefect and MLflow with logins on,
artifacts proxied to the session's S3 server (moto); teammates log in and train through it."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
PASSWORDS = {"bob": "bob-password-7Qx2", "carol": "carol-password-9Zk4", "dave": "dave-password-3Mv8",
             "erin": "erin-password-3Hw8", "frank": "frank-password-5Jt6"}
"""The teammates' passwords: secrets that must show nowhere either."""

pytestmark = pytest.mark.slow


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _gptflow(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptflow.flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _clean_environment() -> dict[str, str]:
    """This process's environment without any server, credential or object store set."""
    return {key: value for key, value in os.environ.items()
            if not key.startswith(("MLFLOW_", "PREFECT_", "AWS_", "GPTFLOW_"))}


@pytest.fixture(scope="module")
def team(s3_server) -> Iterator[dict]:
    """``gptflow up --team`` on an s3:// workspace (its local copy where an unprivileged PostgreSQL
    reaches it), free loopback ports; ``gptflow down`` on leaving."""
    import s3fs

    folder = Path(tempfile.mkdtemp(prefix="gptflow-team-test-", dir="/tmp"))
    folder.chmod(0o711)
    bucket = f"gptflow-team-{os.getpid()}"
    s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=s3_server["AWS_ENDPOINT_URL"], key="testing",
                      secret="testing").mkdir(bucket)
    # One MLflow worker (MLflow's default is 4): a busy 2-core machine starts it in half the time.
    env = {**_clean_environment(), **s3_server, "GPTFLOW_CACHE": str(folder / "cache"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_WORKERS": "1"}
    ports = {"prefect": _free_port(), "mlflow": _free_port(), "postgres": _free_port()}
    arguments = ["up", "--team", "--workspace", f"s3://{bucket}/team", "--prefect-port", str(ports["prefect"]),
                 "--mlflow-port", str(ports["mlflow"]), "--postgres-port", str(ports["postgres"]),
                 "--prefect-public-url", "https://prefect.team.example"]
    started = _gptflow(*arguments, env=env)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        root = Path(next(line.split()[1] for line in started.stdout.splitlines() if line.startswith("workspace ")))
        secrets = json.loads((root / "team" / "secrets.json").read_text())
        yield {"env": env, "arguments": arguments, "ports": ports, "root": root, "bucket": bucket, "secrets": secrets,
               "output": started.stdout + started.stderr, "prefect": f"http://127.0.0.1:{ports['prefect']}/api",
               "mlflow": f"http://127.0.0.1:{ports['mlflow']}"}
    finally:
        _gptflow("down", "--workspace", f"s3://{bucket}/team", env=env, timeout=180)
        shutil.rmtree(folder, ignore_errors=True)


def _status(url: str, credentials: str | None, body: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    if credentials is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def _events_socket(url: str, token: str | None, subprotocol: bool = True) -> str:
    """What Prefect's events websocket at ``url`` answers a client that authenticates with ``token``."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    try:
        with connect(url, subprotocols=["prefect"] if subprotocol else None, open_timeout=30) as socket:
            socket.send(json.dumps({"type": "auth", "token": token}))
            return json.loads(socket.recv(timeout=30))["type"]
    except InvalidStatus as error:
        return f"HTTP {error.response.status_code}"
    except ConnectionClosed as error:
        return f"closed {error.rcvd.code}: {error.rcvd.reason}"


def test_requests_without_valid_credentials_are_refused_by_both_servers(team):
    prefect, mlflow, auth = team["prefect"], team["mlflow"], team["secrets"]["prefect_auth_string"]
    for credentials, expected in ((None, 401), ("gptflow:wrong", 401), (auth, 200)):
        assert _status(f"{prefect}/flows/filter", credentials, b"{}") == expected, credentials
    search = f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1"
    for credentials, expected in ((None, 401), ("admin:wrong", 401), (f"admin:{team['secrets']['admin_password']}", 200)):
        assert _status(search, credentials) == expected, credentials
    # Prefect's events websockets, which its HTTP auth does not cover (PrefectHQ/prefect#17687, fixed in 3.4):
    # refused without the subprotocol that carries the token, and closed on a missing or wrong token.
    for endpoint in ("events/in", "events/out"):
        url = f"{prefect.replace('http://', 'ws://')}/{endpoint}"
        assert _events_socket(url, auth, subprotocol=False) == "HTTP 403"
        assert _events_socket(url, None) == "closed 1008: Auth required but no token provided"
        assert _events_socket(url, "gptflow:wrong") == "closed 1008: Invalid token"
        assert _events_socket(url, auth) == "auth_success"


def test_prefect_keeps_finished_runs_and_events_for_the_stated_retention(team):
    request = urllib.request.Request(f"{team['prefect']}/admin/settings", headers={
        "Authorization": "Basic " + base64.b64encode(team["secrets"]["prefect_auth_string"].encode()).decode()})
    with urllib.request.urlopen(request, timeout=30) as answer:
        server = json.load(answer)["server"]
    vacuum = server["services"]["db_vacuum"]
    assert {"events", "flow_runs"} <= set(vacuum["enabled"]) and vacuum["retention_period"] in (2592000, "P30D")
    assert server["events"]["retention_period"] in ("P30D", 2592000)
    assert server["database"]["connection_url"] != team["secrets"]["database_password"]  # shown masked, if at all


def test_prefect_s_ui_calls_its_api_at_the_public_address(team):
    with urllib.request.urlopen(f"{team['prefect'].removesuffix('/api')}/ui-settings", timeout=30) as answer:
        assert json.load(answer)["api_url"] == "https://prefect.team.example/api"


def test_postgresql_runs_as_an_unprivileged_user(team):
    pid = next(s["pid"] for s in json.loads((team["root"] / "stack.json").read_text())["services"]
               if s["name"] == "postgres")
    user = subprocess.run(["ps", "-o", "user=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    assert user and (user != "root" or os.geteuid() != 0)


def _as(team: dict, username: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": team["mlflow"], "MLFLOW_TRACKING_USERNAME": username,
            "MLFLOW_TRACKING_PASSWORD": team["secrets"]["admin_password"] if username == "admin" else PASSWORDS[username]}


def _user(team: dict, action: str, username: str, *grant: str) -> None:
    """``gptflow user ACTION USERNAME ...`` on the server's machine, as its admin."""
    env = {**team["env"], "GPTFLOW_NEW_USER_PASSWORD": PASSWORDS[username]}
    result = _gptflow("user", action, username, *grant, "--workspace", team["arguments"][3], env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert PASSWORDS[username] not in result.stdout + result.stderr


def test_a_user_without_permission_on_an_experiment_cannot_read_its_runs(team, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from gptflow.flows.team import TeamError, manage_user

    for name, value in _as(team, "admin").items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(team["mlflow"])
    experiment = client.create_experiment("team-private")
    run = client.create_run(experiment).info.run_id
    client.log_param(run, "secret_setting", "42")
    _user(team, "add", "bob")
    with pytest.raises(TeamError, match="The user bob exists already"):
        manage_user(team["mlflow"], "add", "bob", "another-password-1")
    for name, value in _as(team, "bob").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(MlflowException, match="Permission denied"):
        client.get_run(run)
    assert client.search_runs([experiment]) == []  # searches leave out what the user may not read
    _user(team, "grant", "bob", "read", "--experiment", "team-private")
    assert client.get_run(run).data.params == {"secret_setting": "42"}
    with pytest.raises(MlflowException, match="Permission denied"):
        client.log_param(run, "changed", "1")  # read, not edit
    for name, value in _as(team, "admin").items():
        monkeypatch.setenv(name, value)
    manage_user(team["mlflow"], "grant", "bob", permission="none", experiments=["team-private"])
    for name, value in _as(team, "bob").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(MlflowException, match="Permission denied"):
        client.get_run(run)  # taken back


def test_a_removed_user_is_refused_though_the_server_cached_their_password(team):
    search = f"{team['mlflow']}/api/2.0/mlflow/experiments/search?max_results=1"
    _user(team, "add", "frank")
    assert _status(search, f"frank:{PASSWORDS['frank']}") == 200  # checked once, then cached
    _user(team, "remove", "frank")
    # The tests' server has one worker, the one that removed him: it forgets his password at once
    # (others would within flows.team.CREDENTIAL_CACHE_S).
    assert _status(search, f"frank:{PASSWORDS['frank']}") == 401


def test_a_logged_in_teammate_trains_with_artifacts_proxied_to_the_object_store(team, tmp_path):
    import s3fs

    _user(team, "add", "carol")
    client = {**_clean_environment(), "GPTFLOW_LOGIN_FILE": str(tmp_path / "login.json"),
              "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    login = ["login", "--prefect", team["prefect"].removesuffix("/api"), "--mlflow", team["mlflow"], "--username",
             "carol"]
    auth = {"PREFECT_API_AUTH_STRING": team["secrets"]["prefect_auth_string"]}
    refused = _gptflow(*login, env={**client, **auth, "MLFLOW_TRACKING_PASSWORD": "not-hers"})
    assert refused.returncode == 2 and refused.stderr.splitlines() == [
        f"gptflow: error: The MLflow server {team['mlflow']} refused the password of carol: run `gptflow login "
        "--username NAME` (or set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD) with the account its admin "
        "made."]
    logged_in = _gptflow(*login, env={**client, **auth, "MLFLOW_TRACKING_PASSWORD": PASSWORDS["carol"]})
    assert logged_in.returncode == 0, logged_in.stderr
    for kept in (tmp_path / "login.json", tmp_path / "prefect-home" / "profiles.toml"):
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600

    corpus = tmp_path / "corpus"
    shutil.copytree(Path(json.__file__).parent, corpus, ignore=shutil.ignore_patterns("__pycache__"))
    refused = _gptflow("pretrain", "--preset", "tiny", "--corpus", str(corpus), "--workspace", str(tmp_path / "ws"),
                       env={**client, "PREFECT_API_AUTH_STRING": "gptflow:stale"})  # the variable wins over the login
    assert refused.returncode == 2 and refused.stderr.splitlines()[-1] == (
        f"gptflow: error: The Prefect server {team['prefect']} refused this auth string: run `gptflow login` (or set "
        "PREFECT_API_AUTH_STRING) with the one its admin gave you."), refused.stderr
    not_granted = _gptflow("pretrain", "--preset", "tiny", "--corpus", str(corpus), "--workspace",
                           str(tmp_path / "ws"), env=client)
    assert not_granted.returncode == 2 and not_granted.stderr.splitlines()[-1] == (
        f"gptflow: error: The MLflow server {team['mlflow']} does not let carol run in the experiment gptflow-pretrain: "
        "ask its admin for `gptflow user grant carol edit`."), not_granted.stderr[-3000:]
    _user(team, "grant", "carol", "edit")
    # No variable names a server, a credential or the object store: the login does it all.
    trained = _gptflow("pretrain", "--preset", "tiny", "--corpus", str(corpus), "--workspace", str(tmp_path / "ws"),
                       env=client)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    run_id = trained.stdout.split("mlflow      run ")[1].split()[0]
    assert not (tmp_path / "ws" / "mlartifacts").exists()
    store = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=team["env"]["AWS_ENDPOINT_URL"], key="testing",
                              secret="testing")
    assert store.find(f"{team['bucket']}/team/mlartifacts/"), "no artifact reached the object store"
    from mlflow import MlflowClient

    os.environ.update(_as(team, "admin"))  # what a teammate logged, the admin reads
    try:
        admin = MlflowClient(team["mlflow"])
        assert admin.list_artifacts(run_id)
        run = admin.get_run(run_id).data
    finally:
        for name in _as(team, "admin"):
            os.environ.pop(name)
    for secret in (PASSWORDS["carol"], team["secrets"]["prefect_auth_string"]):
        assert secret not in trained.stdout + trained.stderr + logged_in.stdout + logged_in.stderr
        assert all(secret not in value for value in [*run.params.values(), *run.tags.values()])
    # The Prefect CLI uses the login too (its profile): it lists the run.
    listed = subprocess.run([PREFECT, "flow-run", "ls"], env=client, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "pretrain" in listed.stdout, listed.stdout + listed.stderr


def test_a_teammate_s_deployment_run_trains_on_a_worker_and_its_model_downloads_through_the_proxy(
        team, tiny_corpus_dir, tmp_path):
    """The server's machine runs a worker (as the admin, from the secrets); dave's laptop holds his
    login alone: no workspace, no S3 credentials, an empty cache."""
    _user(team, "add", "dave")
    _user(team, "grant", "dave", "edit")
    server = {**team["env"], "PREFECT_API_URL": team["prefect"],
              "PREFECT_API_AUTH_STRING": team["secrets"]["prefect_auth_string"]}
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "gptflow.flows.cli", "worker", "--workspace",
                                   team["arguments"][3]], cwd=ROOT, env={**team["env"], "OMP_NUM_THREADS": "1"},
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "started!" not in log_path.read_text():  # Prefect's "Worker ... started!"
            assert worker.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        deployed = subprocess.run([PREFECT, "--no-prompt", "deploy", "--all"], cwd=ROOT, env=server,
                                  capture_output=True, text=True, timeout=300)
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

        laptop = {**_clean_environment(), "GPTFLOW_LOGIN_FILE": str(tmp_path / "login.json"),
                  "PREFECT_HOME": str(tmp_path / "prefect-home"), "GPTFLOW_CACHE": str(tmp_path / "empty-cache")}
        logged_in = _gptflow("login", "--prefect", team["prefect"].removesuffix("/api"), "--mlflow", team["mlflow"],
                             "--username", "dave", env={**laptop, "MLFLOW_TRACKING_PASSWORD": PASSWORDS["dave"],
                                                        "PREFECT_API_AUTH_STRING": team["secrets"]["prefect_auth_string"]})
        assert logged_in.returncode == 0, logged_in.stderr
        parameters = {"preset": "tiny", "corpus": [str(tiny_corpus_dir)]}
        run = subprocess.run([PREFECT, "deployment", "run", "pretrain/train-gpt", "--params", json.dumps(parameters),
                              "--watch"], cwd=tmp_path, env={**laptop, "COLUMNS": "400"}, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0 and "Completed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
    # The watched log links MLflow runs, the training's among them: the one that registered a model.
    run_ids = sorted(set(re.findall(r"/runs/([0-9a-f]{32})", run.stdout)))
    download = ("import mlflow, pathlib\n"
                f"[version] = [version for run_id in {run_ids!r} "
                "for version in mlflow.MlflowClient().search_model_versions(f\"run_id='{run_id}'\")]\n"
                "folder = mlflow.artifacts.download_artifacts(f'models:/{version.name}/{version.version}', "
                "dst_path='model')\n"
                "print(sorted(path.name for path in pathlib.Path(folder).rglob('*.safetensors')))\n")
    downloaded = subprocess.run([sys.executable, "-c", download], cwd=tmp_path, capture_output=True, text=True,
                                env={**laptop, **_as(team, "dave")}, timeout=300)
    assert downloaded.returncode == 0 and "model.safetensors" in downloaded.stdout, downloaded.stderr[-3000:]


def test_a_teammate_pushes_a_laptop_s_history_once_when_granted_edit(team, tmp_path):
    from mlflow import MlflowClient

    laptop = tmp_path / "laptop"
    laptop.mkdir()
    local = MlflowClient(f"sqlite:///{laptop / 'mlflow.db'}")
    experiment = local.create_experiment("gptflow-pretrain", artifact_location=(laptop / "mlartifacts").as_uri())
    run = local.create_run(experiment, run_name="on the laptop").info.run_id
    local.log_metric(run, "val_loss", 3.5, step=10)
    (tmp_path / "notes.txt").write_text("trained alone")
    local.log_artifact(run, str(tmp_path / "notes.txt"))
    local.set_terminated(run)
    _user(team, "add", "erin")
    teammate = {**_clean_environment(), **_as(team, "erin"), "GPTFLOW_LOGIN_FILE": str(tmp_path / "no-login.json")}
    push = ["push-history", "--workspace", str(laptop)]

    wrong = _gptflow(*push, env={**teammate, "MLFLOW_TRACKING_PASSWORD": "not-his"})
    assert wrong.returncode == 2 and len(wrong.stderr.splitlines()) == 1 and "gptflow login" in wrong.stderr
    refused = _gptflow(*push, env=teammate)
    assert refused.returncode == 2 and refused.stderr.splitlines() == [
        f"gptflow: error: The MLflow server {team['mlflow']} does not let erin write the experiment gptflow-pretrain: "
        "ask its admin for `gptflow user grant erin edit --experiment gptflow-pretrain`, then run the same command "
        "again; it copies only what is not there yet."]
    _user(team, "grant", "erin", "edit")
    pushed = _gptflow(*push, env=teammate)
    assert pushed.returncode == 0 and "1 runs copied, 0 already there" in pushed.stdout, pushed.stderr[-3000:]
    again = _gptflow(*push, env=teammate)
    assert again.returncode == 0 and "0 runs copied, 1 already there" in again.stdout, again.stderr[-3000:]
    assert PASSWORDS["erin"] not in pushed.stdout + pushed.stderr + refused.stdout + refused.stderr

    os.environ.update(_as(team, "admin"))  # the admin, who sees every run, finds it once, with its files
    try:
        team_client = MlflowClient(team["mlflow"])
        copies = team_client.search_runs([team_client.get_experiment_by_name("gptflow-pretrain").experiment_id],
                                         f"tags.`gptflow.copied_from` = '{run}'")
        assert [copy.info.run_name for copy in copies] == ["on the laptop"]
        assert [(m.step, m.value) for m in team_client.get_metric_history(copies[0].info.run_id, "val_loss")] == [
            (10, 3.5)]
        downloaded = team_client.download_artifacts(copies[0].info.run_id, "notes.txt", str(tmp_path / "back"))
        assert Path(downloaded).read_text() == "trained alone"
    finally:
        for name in _as(team, "admin"):
            os.environ.pop(name)


def test_no_secret_shows_in_process_arguments_logs_or_output(team):
    secrets = [value for key, value in team["secrets"].items() if key != "database" and value]
    secrets += list(PASSWORDS.values())
    arguments = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    written = [path.read_text(errors="replace") for path in (team["root"] / "logs").iterdir()]
    written.append((team["root"] / "stack.json").read_text())
    for secret in secrets:
        assert secret not in arguments
        assert secret not in team["output"]
        assert all(secret not in text for text in written)


def test_a_second_up_leaves_the_running_stack_alone(team):
    before = json.loads((team["root"] / "stack.json").read_text())
    again = _gptflow(*team["arguments"], env=team["env"])
    assert again.returncode == 0, again.stderr
    assert f"gptflow: the servers of {team['root']} are running already" in again.stderr
    assert json.loads((team["root"] / "stack.json").read_text()) == before


def test_down_stops_all_three_servers(team):
    pids = [service["pid"] for service in json.loads((team["root"] / "stack.json").read_text())["services"]]
    started = time.monotonic()
    stopped = _gptflow("down", "--workspace", team["arguments"][3], env=team["env"])
    assert stopped.stdout.strip() == "stopped: mlflow, prefect, postgres", stopped.stdout + stopped.stderr
    assert time.monotonic() - started < 120
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "database system is shut down" in (team["root"] / "logs" / "postgres.log").read_text()
    assert not (team["root"] / "stack.json").exists()
