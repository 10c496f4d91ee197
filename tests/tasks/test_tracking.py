"""MLflow conventions against a real SQLite tracking store in a temp workspace."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from gptflow.data.commits import CONTENTS_FILE, read_contents_hash
from gptflow.data.disk_space import OutOfSpaceError
from gptflow.model.checkpoint import save_final
from gptflow.model.config import ModelConfig
from gptflow.model.gpt import GPT
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.tracking.experiments import TrackingServerUnreachable
from gptflow.tasks.tracking.killed_runs import HOST_TAG, KILLED_TAG, PID_TAG
from gptflow.tasks.tracking.naming import run_name, source_label
from gptflow.tasks.tracking.outbox import Outbox, send_outboxes
from gptflow.tasks.tracking.run import BufferedMetrics, PipelineRun, pipeline_run
from gptflow.tasks.tracking.server import server_unreachable
from gptflow.tasks.tracking.training_reporter import HISTORY_FILE, show_reused_training


@pytest.fixture()
def workspace(tmp_path, monkeypatch) -> Workspace:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return Workspace.resolve(tmp_path / "ws")


def test_run_logs_params_tags_stage_status_and_artifacts_into_the_workspace(workspace, tmp_path):
    report = tmp_path / "report.json"
    report.write_text("{}")
    with pipeline_run(workspace, "pretrain", tags={"gptflow.flow": "pretrain"}, name="pretrain-test") as run:
        run.log_params({f"section.field_{i}": i for i in range(150)})  # more than one batch
        run.record_stage("ingest", "cached")
        run.log_metrics({"eval/val_loss": 2.5}, step=7)
        run.log_artifact(report, "eval")
    stored = MlflowClient(workspace.tracking_uri).get_run(run.run_id)
    assert stored.info.status == "FINISHED" and stored.info.run_name == "pretrain-test"
    assert len([k for k in stored.data.params if k.startswith("section.")]) == 150
    assert stored.data.tags["gptflow.stage.ingest"] == "cached" and run.stage_statuses == {"ingest": "cached"}
    assert stored.data.metrics["eval/val_loss"] == 2.5
    assert stored.info.artifact_uri.startswith(workspace.mlflow_artifacts.as_uri())
    assert (workspace.mlflow_artifacts / run.run_id / "artifacts/eval/report.json").exists()


def test_a_store_directory_is_logged_without_its_integrity_record(workspace):
    with workspace.artifacts.commit(workspace.store / "eval" / "key") as directory:
        (directory / "report.json").write_text("{}")
        (directory / "plots").mkdir()
        (directory / "plots" / "curve.png").write_bytes(b"png")
    assert (workspace.store / "eval" / "key" / CONTENTS_FILE).is_file()
    with pipeline_run(workspace, "pretrain", tags={}, name="artifacts") as run:
        run.log_artifact(workspace.store / "eval" / "key", "eval")
    logged = workspace.mlflow_artifacts / run.run_id / "artifacts" / "eval"
    assert sorted(path.relative_to(logged).as_posix() for path in logged.rglob("*") if path.is_file()) == [
        "plots/curve.png", "report.json"]


def _tiny_model(tmp_path, bpe_tokenizer_file) -> tuple[Path, Path]:
    """A saved GPT of a few hundred parameters and its tokenizer: what a training leaves to log."""
    torch.manual_seed(0)
    final = save_final(tmp_path / "run", GPT(ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=384)))
    return final, Path(shutil.copyfile(bpe_tokenizer_file, tmp_path / "run" / "tokenizer.json"))


def _log_described_model(run: PipelineRun, final: Path, tokenizer_file: Path) -> str:
    run.log_params({"preset": "tiny", "model.n_layer": 1, "train.learning_rate": 0.003, "eval.eval_tokens": 100,
                    "sampling.top_k": 5})
    run.log_dataset("corpus", "abcd1234", ["corpus/"], {"documents": 3}, context="training")
    registered = run.log_text_generator(final, tokenizer_file, "gptflow-tiny", "Text generator: a test model.")
    run.log_metrics({"eval/val_loss": 2.5}, step=3, model_of_run=run.run_id)
    return registered


def _assert_described(client: MlflowClient, run_id: str, final: Path) -> None:
    """The run's logged model is named as its registered model, described, with the settings that
    made it as params and its evaluation's metric measured on the run's dataset."""
    [output] = client.get_run(run_id).outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.name == "gptflow-tiny" and model.tags["mlflow.note.content"] == "Text generator: a test model."
    assert model.params == {"preset": "tiny", "model.n_layer": "1", "train.learning_rate": "0.003",
                            "weights_hash": read_contents_hash(final)}
    [metric] = model.metrics
    assert (metric.key, metric.value, metric.step) == ("eval/val_loss", 2.5, 3)
    assert (metric.dataset_name, metric.dataset_digest) == ("corpus", "abcd1234")  # the page's "Datasets used"
    version = client.get_model_version("gptflow-tiny", "1")
    assert version.description == "Text generator: a test model." and version.source == model.artifact_location
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": "gptflow-tiny", "version": 1}]


def test_a_logged_model_is_named_described_and_carries_its_settings_metrics_and_dataset(
    workspace, tmp_path, bpe_tokenizer_file
):
    final, tokenizer_file = _tiny_model(tmp_path, bpe_tokenizer_file)
    with pipeline_run(workspace, "pretrain", tags={}, name="model") as run:
        assert _log_described_model(run, final, tokenizer_file) == "gptflow-tiny/1"
    _assert_described(MlflowClient(workspace.tracking_uri), run.run_id, final)


def test_a_run_that_reused_a_training_shows_its_model_curves_and_where_they_come_from(
    workspace, tmp_path, bpe_tokenizer_file
):
    final, tokenizer_file = _tiny_model(tmp_path, bpe_tokenizer_file)
    with pipeline_run(workspace, "pretrain", tags={}, name="trained") as trained:
        trained.log_text_generator(final, tokenizer_file, "gptflow-tiny", "Text generator: a test model.")
    report = tmp_path / "report"
    report.mkdir()
    (report / HISTORY_FILE).write_text(json.dumps({"train/loss": [[5, 6.1], [10, 5.4]], "val/loss": [[10, 5.5]]}))
    with pipeline_run(workspace, "pretrain", tags={}, name="cached") as cached:
        show_reused_training(cached, trained.run_id, "gptflow-tiny/1", report)
    client = MlflowClient(workspace.tracking_uri)
    stored = client.get_run(cached.run_id)
    assert [model.model_id for model in stored.inputs.model_inputs] == [
        output.model_id for output in client.get_run(trained.run_id).outputs.model_outputs]
    assert [(point.step, point.value) for point in client.get_metric_history(cached.run_id, "train/loss")] == [
        (5, 6.1), (10, 5.4)]
    description = stored.data.tags["mlflow.note.content"]
    assert description.startswith(f"**Reused training**: run [{trained.run_id[:8]}]"
                                  f"(#/experiments/{cached.experiment_id}/runs/{trained.run_id}?")
    assert "[gptflow-tiny/1](#/models/gptflow-tiny/versions/1?" in description


def test_run_is_marked_failed_when_the_flow_raises(workspace):
    with pytest.raises(RuntimeError), pipeline_run(workspace, "pretrain", tags={}, name="doomed") as run:
        raise RuntimeError("stage exploded")
    assert MlflowClient(workspace.tracking_uri).get_run(run.run_id).info.status == "FAILED"


def test_buffered_metrics_send_every_step_in_few_batches(workspace):
    with pipeline_run(workspace, "pretrain", tags={}, name="metrics") as run:
        buffered = BufferedMetrics(run, flush_every_s=3600)
        for step in range(1, 601):
            buffered.add(step, {"train/loss": 10.0 / step, "train/lr": 1e-3})
        assert len(buffered.pending) == 200  # 1200 metrics: one full batch of 1000 already sent
        buffered.flush()
        assert buffered.pending == []
    history = MlflowClient(workspace.tracking_uri).get_metric_history(run.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 601))
    assert history[-1].value == pytest.approx(10.0 / 600)


def test_runs_this_host_left_running_in_a_process_now_gone_are_marked_killed(workspace):
    """In any workflow's experiment: here a fine-tune's, found by the next pretraining."""
    with pipeline_run(workspace, "finetune", tags={}, name="first") as first:
        pass
    client = MlflowClient(workspace.tracking_uri)
    experiment_id = client.get_run(first.run_id).info.experiment_id
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    host = socket.gethostname()

    def running(name: str, host: str, pid: int) -> str:
        return client.create_run(experiment_id, run_name=name, tags={HOST_TAG: host, PID_TAG: str(pid)}).info.run_id

    gone = running("gone", host, ended.pid)
    unreaped = subprocess.Popen([sys.executable, "-c", "pass"])  # ends, and stays a zombie until waited for
    while Path(f"/proc/{unreaped.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        time.sleep(0.05)
    zombie = running("zombie", host, unreaped.pid)
    alive = running("alive", host, os.getpid())
    elsewhere = running("elsewhere", "another-machine", ended.pid)

    with pipeline_run(workspace, "pretrain", tags={}, name="next") as run:
        assert client.get_run(gone).info.status == "KILLED"
    assert "ended without ending the run" in client.get_run(gone).data.tags[KILLED_TAG]
    assert client.get_run(zombie).info.status == "KILLED"
    unreaped.wait()
    assert client.get_run(alive).info.status == client.get_run(elsewhere).info.status == "RUNNING"
    tags = client.get_run(run.run_id).data.tags
    assert (tags[HOST_TAG], tags[PID_TAG]) == (host, str(os.getpid()))


def test_a_second_ctrl_c_while_the_run_is_marked_still_leaves_it_killed(workspace, monkeypatch):
    write_tags = PipelineRun.set_tags

    def impatient_user(run: PipelineRun, tags: dict) -> None:
        write_tags(run, tags)
        if KILLED_TAG in tags:
            os.kill(os.getpid(), signal.SIGINT)  # pressed again between the reason and the end

    monkeypatch.setattr(PipelineRun, "set_tags", impatient_user)
    with pytest.raises(KeyboardInterrupt), pipeline_run(workspace, "pretrain", tags={}, name="stopped") as run:
        raise KeyboardInterrupt
    stopped = MlflowClient(workspace.tracking_uri).get_run(run.run_id)
    assert stopped.info.status == "KILLED" and stopped.data.tags[KILLED_TAG].startswith("interrupted")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_artifact_that_does_not_fit_names_where_it_went_and_leaves_nothing(workspace, tmp_path, monkeypatch):
    report = tmp_path / "report.json"
    report.write_text("{}" * 1000)

    def copy_until_the_disk_is_full(source, target, length=0):
        target.write(source.read(10))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("mlflow.store.artifact.local_artifact_repo.shutil.copyfileobj", copy_until_the_disk_is_full)
    with pipeline_run(workspace, "pretrain", tags={}, name="full") as run, pytest.raises(OutOfSpaceError) as raised:
        run.log_artifact(report, "eval")
    artifacts = workspace.mlflow_artifacts / run.run_id / "artifacts"
    assert str(raised.value).startswith(f"out of space writing {artifacts}/eval: the disk is full")
    assert [path for path in artifacts.rglob("*") if path.is_file()] == []


@pytest.fixture()
def nowhere(monkeypatch) -> str:
    """The address of a tracking server that is not there; MLflow gives up on it at once."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture()
def dies_mid_answer(monkeypatch) -> str:
    """The address of a server that promises a long answer and closes its connection after a few
    bytes of it, as a tracking server killed while replying does."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    listener = socket.create_server(("127.0.0.1", 0))

    def answer_and_die() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # the listener was closed: the test is over
                return
            with connection:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                   b"Content-Length: 10210\r\n\r\n{\"run\": ")

    threading.Thread(target=answer_and_die, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def test_a_server_that_dies_while_answering_counts_as_away(dies_mid_answer, nowhere):
    with pytest.raises(MlflowException) as cut_short:
        MlflowClient(dies_mid_answer).get_run("0" * 32)
    assert "IncompleteRead" in str(cut_short.value)
    assert server_unreachable(cut_short.value)
    with pytest.raises(MlflowException) as refused:
        MlflowClient(nowhere).get_run("0" * 32)
    assert server_unreachable(refused.value)


def _new_run(workspace: Workspace) -> tuple[MlflowClient, str]:
    store = MlflowClient(workspace.tracking_uri)
    experiment_id = store.create_experiment("outbox", artifact_location=workspace.mlflow_artifacts.as_uri())
    return store, store.create_run(experiment_id).info.run_id


def _server_back_at(outbox: Outbox, tracking_uri: str) -> None:
    """As if the server the outbox records answered again, at ``tracking_uri``: the test's own store."""
    state = outbox.path.with_suffix(".json")
    state.write_text(json.dumps({**json.loads(state.read_text()), "tracking_uri": tracking_uri}))


def test_writes_wait_in_the_outbox_while_the_server_is_away_then_replay_in_order(workspace, tmp_path, nowhere, caplog):
    store, run_id = _new_run(workspace)
    report = tmp_path / "report.json"
    report.write_text("{}")
    offline = PipelineRun(MlflowClient(nowhere), run_id, Outbox(workspace, run_id))
    offline.log_params({"train.max_steps": 30})
    offline.set_tags({"gptflow.stage.pretrain": "running"})
    offline.log_metrics({"train/loss": 3.0}, step=1)
    offline.log_metrics({"train/loss": 2.0}, step=2)
    offline.set_tags({"gptflow.stage.pretrain": "executed"})
    offline.log_artifact(report, "eval")
    offline.log_text("hello", "notes/hello.txt")
    ended = int(time.time() * 1000)
    offline.end("FINISHED")

    outbox = Outbox(workspace, run_id)
    assert outbox.path == workspace.root / "mlflow-outbox" / f"{run_id}.jsonl"
    kinds = [json.loads(line)["kind"] for line in outbox.path.read_text().splitlines()]
    assert kinds == ["log_batch"] * 5 + ["log_artifact", "log_text", "set_terminated"]
    assert store.get_run(run_id).info.status == "RUNNING" and not store.get_run(run_id).data.params
    [warning] = [record.getMessage() for record in caplog.records if "still cannot be reached" in record.getMessage()]
    assert f"8 operations of run {run_id}" in warning and str(outbox.path) in warning
    assert f"gptflow sync --workspace {workspace.root}" in warning

    with outbox.lock():
        sent = PipelineRun(store, run_id, outbox).send_outbox()
    assert (sent.sent, sent.kept) == (8, 0) and outbox.is_empty()
    assert not list((workspace.root / "mlflow-outbox").iterdir())
    stored = store.get_run(run_id)
    assert stored.info.status == "FINISHED" and stored.info.end_time >= ended
    assert stored.data.params == {"train.max_steps": "30"}
    assert stored.data.tags["gptflow.stage.pretrain"] == "executed"  # the later write wins, as it would have
    assert [metric.value for metric in store.get_metric_history(run_id, "train/loss")] == [3.0, 2.0]
    assert {artifact.path for artifact in store.list_artifacts(run_id)} == {"eval", "notes"}
    assert (workspace.mlflow_artifacts / run_id / "artifacts/notes/hello.txt").read_text() == "hello"


def test_a_model_logged_while_the_server_is_away_is_described_and_measured_when_replayed(
    workspace, tmp_path, nowhere, bpe_tokenizer_file
):
    store, run_id = _new_run(workspace)
    final, tokenizer_file = _tiny_model(tmp_path, bpe_tokenizer_file)
    offline = PipelineRun(MlflowClient(nowhere), run_id, Outbox(workspace, run_id))
    assert _log_described_model(offline, final, tokenizer_file) == "gptflow-tiny/pending"
    _server_back_at(offline.outbox, workspace.tracking_uri)
    [report] = send_outboxes(workspace)
    assert report.kept == 0
    _assert_described(store, run_id, final)


def test_a_replay_that_stops_halfway_goes_on_after_the_last_operation_it_sent(workspace):
    outbox = Outbox(workspace, "0" * 32)
    for number in range(4):
        outbox.append({"kind": "log_batch", "number": number}, "http://example.invalid")
    sent = []

    def send_two(operation):
        if len(sent) == 2:
            raise ConnectionError("gone again")
        sent.append(operation["number"])

    with pytest.raises(ConnectionError):
        outbox.replay(send_two)
    assert outbox.waiting() == {"log_batch": 2} and outbox.next_line() == 3
    sent.clear()
    outbox.replay(lambda operation: sent.append(operation["number"]))
    assert sent == [2, 3] and outbox.is_empty()


def test_a_copied_outbox_sends_the_copy_s_files(workspace, tmp_path):
    outbox = Outbox(workspace, "0" * 32)
    outbox.append({"kind": "log_artifact", "path": str(workspace.store / "eval" / "report.json"),
                   "artifact_path": "eval"}, "http://example.invalid")
    copy = Workspace.resolve(tmp_path / "copy")
    shutil.copytree(workspace.root, copy.root, dirs_exist_ok=True)
    sent = []
    Outbox(copy, "0" * 32).replay(sent.append)
    assert [operation["path"] for operation in sent] == [str(copy.store / "eval" / "report.json")]


def test_an_operation_the_server_refuses_raises_and_is_never_kept(workspace):
    store, run_id = _new_run(workspace)
    run = PipelineRun(store, run_id, Outbox(workspace, run_id))
    run.log_params({"seed": 1})
    with pytest.raises(MlflowException):
        run.log_params({"seed": 2})  # MLflow never changes a param
    assert run.outbox.is_empty()


def test_a_kept_operation_the_server_refuses_is_reported_and_stays(workspace, tmp_path, nowhere):
    store, run_id = _new_run(workspace)
    removed = tmp_path / "removed.json"
    removed.write_text("{}")
    offline = PipelineRun(MlflowClient(nowhere), run_id, Outbox(workspace, run_id))
    offline.log_artifact(removed)
    offline.log_metrics({"eval/val_loss": 2.5})
    removed.unlink()
    _server_back_at(offline.outbox, workspace.tracking_uri)

    [report] = send_outboxes(workspace)
    assert (report.sent, report.kept) == (0, 2)
    assert report.problem.startswith(f"could not send operation 1 of {offline.outbox.path}")
    assert "delete that line" in report.problem
    assert "eval/val_loss" not in store.get_run(run_id).data.metrics


def test_a_new_run_first_sends_what_earlier_runs_kept(workspace, nowhere):
    store, run_id = _new_run(workspace)
    offline = PipelineRun(MlflowClient(nowhere), run_id, Outbox(workspace, run_id))
    offline.log_metrics({"eval/val_loss": 2.5})
    offline.end("FINISHED")
    _server_back_at(offline.outbox, workspace.tracking_uri)

    with pipeline_run(workspace, "pretrain", tags={}, name="next"):
        earlier = store.get_run(run_id)
        assert earlier.info.status == "FINISHED" and earlier.data.metrics["eval/val_loss"] == 2.5
    assert offline.outbox.is_empty()


def test_a_run_cannot_start_on_a_server_that_is_away(workspace, nowhere, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", nowhere)
    with pytest.raises(TrackingServerUnreachable, match=f"{nowhere} \\(MLFLOW_TRACKING_URI\\) cannot be reached. "
                       "Start it \\(`gptflow up`.*or unset MLFLOW_TRACKING_URI"):
        with pipeline_run(workspace, "pretrain", tags={}, name="never"):
            pass


def test_a_run_name_leads_with_the_settings_in_the_order_given():
    overrides = {"model.n_layer": 4, "train.learning_rate": "3e-3"}
    assert run_name("pretrain", overrides, "tiny", None, "stdlib") == "n_layer=4 learning_rate=3e-3 · pretrain tiny stdlib"
    assert run_name("pretrain", dict(reversed(overrides.items())), "tiny") == "learning_rate=3e-3 n_layer=4 · pretrain tiny"
    assert run_name("evaluate", None, "gptflow-tiny/1") == "evaluate gptflow-tiny/1"


def test_a_corpus_named_by_an_e_mail_address_is_labelled_without_it():
    assert source_label("/mail/jane.doe@example.com.jsonl") == "<EMAIL>.jsonl"
    assert source_label("/data/web/") == "web" and source_label("runs/abc/final") == "abc/final"
def test_a_tag_another_process_set_is_read_back_from_the_store_or_from_the_outbox(workspace, nowhere):
    store, run_id = _new_run(workspace)
    PipelineRun(store, run_id, Outbox(workspace, run_id)).set_tags({"gptflow.resumed_from_step": 15})
    assert PipelineRun(store, run_id, Outbox(workspace, run_id)).stored_tag("gptflow.resumed_from_step") == "15"
    offline = PipelineRun(MlflowClient(nowhere), run_id, Outbox(workspace, run_id))
    offline.set_tags({"gptflow.resumed_from_step": 20})
    assert offline.stored_tag("gptflow.resumed_from_step") == "20"  # without asking the server that is away
    assert offline.stored_tag("gptflow.other") is None


def test_whether_the_store_holds_a_run_and_a_tag_deleted_while_the_server_is_away(workspace, nowhere):
    store, run_id = _new_run(workspace)
    online = PipelineRun(store, run_id, Outbox(workspace, run_id))
    assert online.store_holds_run(run_id) is True and online.store_holds_run("0" * 32) is False
    online.set_tags({"gptflow.previous_run": "0" * 32})
    offline = PipelineRun(MlflowClient(nowhere), run_id, Outbox(workspace, run_id))
    offline.delete_tag("gptflow.previous_run")
    assert offline.store_holds_run(run_id) is None  # not asked: its writes wait in the outbox
    with offline.outbox.lock():
        PipelineRun(store, run_id, offline.outbox).send_outbox()
    assert "gptflow.previous_run" not in store.get_run(run_id).data.tags
