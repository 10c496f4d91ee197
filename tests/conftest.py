"""Fixtures shared by every test package."""

from __future__ import annotations

import contextlib
import io
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

# Telemetry from the test server fails offline and competes for its SQLite database.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

# A few real standard-library packages: real text, present on every machine, ~300 KB.
TINY_CORPUS_PACKAGES = ("json", "logging", "email", "collections", "importlib")


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory) -> Path:
    """A folder of real Python source files, small enough for the ``tiny`` preset."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = tmp_path_factory.mktemp("tiny-corpus")
    for package in TINY_CORPUS_PACKAGES:
        for source in sorted((stdlib / package).glob("*.py")):
            shutil.copy2(source, corpus / f"{package}_{source.name}")
    return corpus


@pytest.fixture(scope="session")
def stdlib_text() -> Callable[[int], str]:
    """``stdlib_text(n)``: whole standard-library modules joined until the text has at least ``n``
    characters; real text as one large file (a book, a log) holds it."""
    modules = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))

    def text(min_chars: int) -> str:
        parts: list[str] = []
        for module in modules:
            parts.append(module.read_text(encoding="utf-8"))
            if sum(map(len, parts)) >= min_chars:
                return "".join(parts)
        raise ValueError(f"the standard library holds fewer than {min_chars} characters of top-level modules")

    return text


@pytest.fixture(scope="session")
def prefect_api_url() -> str:
    """One real Prefect server (the test harness) for the whole session; its URL for subprocesses."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def ray_cluster(s3_server) -> Iterator[str]:
    """A real Ray cluster on 127.0.0.1 (`ray start --head`, 2 CPUs, a 200 MB object store, no
    dashboard) for the whole session; its address. Its workers reach the session's S3 server, as a
    cluster's nodes have the object store's credentials of their own. Stopped with its process
    group, so a Ray cluster the user runs beside it is left alone."""
    with _ray_head(s3_server) as address:
        yield address


@pytest.fixture(scope="module")
def ray_cluster_with_gpus(s3_server) -> Iterator[str]:
    """Such a cluster, for one test module, that declares 2 GPUs it does not have: Ray hands them
    out to the tasks that ask for them (``CUDA_VISIBLE_DEVICES``) as it would real ones."""
    with _ray_head(s3_server, "--num-gpus", "2") as address:
        yield address


@contextlib.contextmanager
def _ray_head(s3_server: dict[str, str], *options: str) -> Iterator[str]:
    temp_dir = tempfile.mkdtemp(prefix="gptflow-ray-", dir="/tmp")  # short: Ray puts sockets in it
    port = _free_port()
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--port", str(port),
         "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--object-store-memory", str(200 * 1024 * 1024),
         "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", temp_dir, *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **s3_server},
    )
    try:
        deadline = time.monotonic() + 120
        while not _answers(port):
            assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


class MotoServer:
    """A real S3 server on 127.0.0.1 (moto's standalone server, in its own process group) that a
    test may stop, pause and start again on the same port; it keeps its objects in memory only."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.environment = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while not _answers(self.port):
            assert self.process.poll() is None and time.monotonic() < deadline, "the moto S3 server did not start"
            time.sleep(0.2)

    def stop(self) -> None:
        """Kill it and wait until its port refuses connections."""
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGCONT)  # a paused server dies too
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
            self.process = None

    def pause(self, paused: bool = True) -> None:
        """SIGSTOP it (connections are accepted by the kernel, never answered), or SIGCONT it."""
        os.killpg(self.process.pid, signal.SIGSTOP if paused else signal.SIGCONT)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """A real S3 server on 127.0.0.1 (moto's standalone server) for the whole session: the
    environment that points boto3 / s3fs at it, with dummy credentials. Stopped with its group."""
    server = MotoServer()
    server.start()
    try:
        yield server.environment
    finally:
        server.stop()


@pytest.fixture()
def own_s3_server(monkeypatch) -> Iterator[MotoServer]:
    """A real S3 server of this test's own, to stop, pause and restart, with a bucket ``gptflow-test``;
    this process's environment points at it."""
    import s3fs

    server = MotoServer()
    server.start()
    for name, value in server.environment.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("gptflow-test")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def s3_bucket(s3_server, monkeypatch) -> Iterator[str]:
    """A fresh bucket on the session's S3 server, this process's environment pointed at it; its
    ``s3://`` URL."""
    import s3fs

    for name, value in s3_server.items():
        monkeypatch.setenv(name, value)
    bucket = f"gptflow-test-{uuid.uuid4().hex[:12]}"
    filesystem = s3fs.S3FileSystem(skip_instance_cache=True)
    filesystem.mkdir(bucket)
    yield f"s3://{bucket}"
    filesystem.rm(bucket, recursive=True)


@pytest.fixture
def artifact_serving_mlflow(tmp_path) -> Iterator[str]:
    """The URL of a real ``mlflow server`` on SQLite that serves its artifacts, as a team's does."""
    folder = tmp_path / "served-mlflow"
    folder.mkdir()
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--serve-artifacts",
         "--artifacts-destination", (folder / "artifacts").as_uri()],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not _answers(port):
        assert server.poll() is None and time.monotonic() < deadline, "the MLflow server did not start"
        time.sleep(0.5)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


@pytest.fixture(scope="session")
def postgresql() -> Iterator[dict[str, str]]:
    """A real PostgreSQL server (Debian's package) on 127.0.0.1 at a free port for the whole session,
    initialised in a temporary folder and run as an unprivileged user when the tests run as root
    (PostgreSQL refuses root): ``host``, ``port``, ``user`` and ``password`` of its superuser."""
    import glob
    import pwd
    import secrets

    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda path: int(Path(path).parent.name))
    if not binaries:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    as_user = {}
    folder = Path(tempfile.mkdtemp(prefix="gptflow-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres") if "postgres" in {entry.pw_name for entry in pwd.getpwall()} \
            else pwd.getpwnam("nobody")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    password = secrets.token_urlsafe(16)
    password_file = folder / "password"
    password_file.write_text(password)
    if as_user:
        os.chown(password_file, as_user["user"], as_user["group"])
    subprocess.run([f"{binaries[-1]}/initdb", "-D", str(folder / "data"), "-U", "tester", "--auth=scram-sha-256",
                    f"--pwfile={password_file}", "--no-locale", "--no-instructions"],
                   check=True, capture_output=True, **as_user)
    port = _free_port()
    server = subprocess.Popen(
        [f"{binaries[-1]}/postgres", "-D", str(folder / "data"), "-c", "listen_addresses=127.0.0.1", "-c", f"port={port}",
         "-c", "unix_socket_directories="], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        **as_user)
    try:
        deadline = time.monotonic() + 60
        while not _answers(port):
            assert server.poll() is None and time.monotonic() < deadline, "PostgreSQL did not start"
            time.sleep(0.2)
        yield {"host": "127.0.0.1", "port": str(port), "user": "tester", "password": password}
    finally:
        server.send_signal(signal.SIGINT)  # its fast shutdown
        server.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture
def gptflow_copy(tmp_path) -> Path:
    """A copy of gptflow's source to edit: a process whose PYTHONPATH is the returned folder imports
    the copy's gptflow package instead of the installed one."""
    from gptflow.data.code_version import module_file

    root = tmp_path / "source"
    for layer in ("data", "model", "tasks", "flows"):
        shutil.copytree(module_file(f"gptflow.{layer}").parent, root / "gptflow" / layer,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.fixture
def artifact_paths() -> Callable[..., set[str]]:
    """Every artifact path of an MLflow run, with its logged model's files as ``model/<path>``."""
    from mlflow import MlflowClient

    def listed(list_artifacts: Callable, path: str | None = None) -> set[str]:
        found = set()
        for entry in list_artifacts(path):
            found |= listed(list_artifacts, entry.path) if entry.is_dir else {entry.path}
        return found

    def paths(client: MlflowClient, run_id: str) -> set[str]:
        found = listed(lambda path: client.list_artifacts(run_id, path))
        for output in client.get_run(run_id).outputs.model_outputs:
            model_files = listed(lambda path: client.list_logged_model_artifacts(output.model_id, path))
            found |= {f"{client.get_logged_model(output.model_id).name}/{path}" for path in model_files}
        return found

    return paths


@pytest.fixture
def write_shard() -> Callable[[Path, np.ndarray, int], Path]:
    """Writes tokens as the tokenize stage does: an Arrow IPC file of ``tokens`` record batches."""

    def write(path: Path, tokens: np.ndarray, batch_tokens: int = 100) -> Path:
        schema = pa.schema([("tokens", pa.from_numpy_dtype(tokens.dtype))])
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for start in range(0, len(tokens), batch_tokens):
                writer.write_batch(pa.record_batch([pa.array(tokens[start : start + batch_tokens])], schema=schema))
        return path

    return write


@pytest.fixture(scope="session")
def bpe_tokenizer_file(tmp_path_factory) -> Path:
    """A gptflow tokenizer.json (byte-level BPE, special tokens first) of about 300 ids, trained in
    a moment on two standard-library modules; they pad to 384 embedding rows."""
    from tokenizers import pre_tokenizers, trainers

    from gptflow.data.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILE, _untrained_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / "json" / name).read_text() for name in ("decoder.py", "encoder.py")]
    tokenizer = _untrained_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    path = tmp_path_factory.mktemp("tokenizer") / TOKENIZER_FILE
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="session")
def file_size_limit() -> Callable[[int], Callable[[], None]]:
    """``file_size_limit(n)``: a ``preexec_fn`` for a child process whose writes past ``n`` bytes in
    a file then fail with EFBIG, as writes to a full disk fail with ENOSPC: a full disk without
    mounting anything (the signal SIGXFSZ, ignored here, would kill the child instead)."""

    def limit(limit_bytes: int) -> Callable[[], None]:
        def apply() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

        return apply

    return limit


@pytest.fixture
def small_tmpfs(tmp_path, request) -> Iterator[Path]:
    """A tmpfs of ``request.param`` bytes: a disk that really fills up (ENOSPC). Skipped where this
    process may not mount (not root, or in a container without the capability)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    # Lazily: an MLflow store on it stays open in MLflow's cached database engine of this process.
    subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


@pytest.fixture
def one_rank_group(tmp_path):
    """A process group of this process alone: FSDP and sharded checkpoints work at world size 1."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def run_at_once(tmp_path) -> Callable[..., list[tuple[int, str]]]:
    """``run_at_once([(command, env), ...])`` starts the commands together in the repository root
    and waits for all; their exit codes and outputs. Each writes to a file: a pipe would fill while
    the test waited on another process, and its writer would block, waiting on nothing."""
    root = Path(__file__).resolve().parent.parent

    def run(commands: list[tuple[list[str], dict[str, str]]], timeout: float = 600) -> list[tuple[int, str]]:
        logs = [tmp_path / f"at-once-{index}.log" for index in range(len(commands))]
        processes = []
        for (command, env), log in zip(commands, logs):
            with log.open("w") as output:
                processes.append(subprocess.Popen(command, cwd=root, env=env, stdout=output, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        try:
            for process in processes:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
        return [(process.returncode, log.read_text()) for process, log in zip(processes, logs)]

    return run


WEB_PAGES = Path(__file__).parent / "fixtures" / "web"


@pytest.fixture
def write_warc() -> Callable[[Path, list[tuple[str, str, bytes]], bool], None]:
    """``write_warc(path, records, gzipped)``: a WARC file written by warcio's own writer, a request
    and a response record per ``(url, content_type, body)``."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    def write(path: Path, records: list[tuple[str, str, bytes]], gzipped: bool) -> None:
        with open(path, "wb") as stream:
            writer = WARCWriter(stream, gzip=gzipped)
            for url, content_type, body in records:
                request = io.BytesIO(b"GET / HTTP/1.1\r\n\r\n")
                writer.write_record(writer.create_warc_record(url, "request", payload=request))
                headers = StatusAndHeaders("200 OK", [("Content-Type", content_type)], protocol="HTTP/1.1")
                writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(body),
                                                              http_headers=headers))

    return write


@pytest.fixture
def make_crawl(write_warc) -> Callable[..., Path]:
    """``make_crawl(folder, gzipped=True)``: ``folder/crawl/pages.warc[.gz]`` of the three pages in
    tests/fixtures/web (English, French, German: records 2, 6 and 8), an image (record 4) and a
    page with no main text (record 10)."""

    def make(folder: Path, gzipped: bool = True) -> Path:
        records = [
            ("https://example.org/en", "text/html; charset=utf-8", (WEB_PAGES / "article_en.html").read_bytes()),
            ("https://example.org/logo.png", "image/png", b"\x89PNG\r\n\x1a\n" + bytes(64)),
            ("https://example.fr/", "text/html; charset=utf-8", (WEB_PAGES / "article_fr.html").read_bytes()),
            ("https://example.de/", "text/html; charset=iso-8859-1", (WEB_PAGES / "article_de.htm").read_bytes()),
            ("https://example.org/empty", "text/html", b"<html><body><nav><a href='/'>Home</a></nav></body></html>"),
        ]
        path = folder / "crawl" / ("pages.warc.gz" if gzipped else "pages.warc")
        path.parent.mkdir(exist_ok=True)
        write_warc(path, records, gzipped)
        return path

    return make
