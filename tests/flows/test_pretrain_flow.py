"""The whole pretrain flow on a tiny corpus, with a real Prefect server and a real MLflow store."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

from gptflow.data.commits import is_complete
from gptflow.flows.stack import answers

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("ingest", "tokenizer", "tokenize", "pretrain", "evaluate")

pytestmark = pytest.mark.slow


def _gptflow(
    *args: str, env: dict[str, str], preexec_fn: Callable[[], None] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptflow.flows.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600, preexec_fn=preexec_fn,
    )


@pytest.fixture()
def cli_env(prefect_api_url, tmp_path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update(PREFECT_API_URL=prefect_api_url, GPTFLOW_HOME=str(tmp_path / "workspace"))
    return env


def _runs_oldest_first(workspace: Path) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gptflow-pretrain")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_pretrain_twice_in_two_processes_second_run_is_fully_cached(cli_env, tiny_corpus_dir, artifact_paths):
    args = ("pretrain", "--corpus", str(tiny_corpus_dir), "--preset", "tiny")
    first = _gptflow(*args, env=cli_env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = _gptflow(*args, env=cli_env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "unigram baseline" in second.stdout
    # The run's page and its experiment's runs table, both in MLflow's machine-learning view.
    addresses = re.findall(r"http://\S+/#/experiments/\S+", second.stdout)
    assert len(addresses) == 2 and all(address.endswith("workflowType=machine_learning") for address in addresses)
    assert re.search(r"^compare     gptflow-pretrain: http://\S+/runs\?viewStateShareKey=gptflow&", second.stdout,
                     re.MULTILINE)
    # The model is named where the run ends, whether it trained it or reused it.
    for output in (first.stdout, second.stdout):
        assert "\nmodel       models:/gptflow-tiny/1: gptflow generate --model models:/gptflow-tiny/1" in output

    workspace = Path(cli_env["GPTFLOW_HOME"])
    client, (first_run, second_run) = _runs_oldest_first(workspace)
    for stage in STAGES:
        assert first_run.data.tags[f"gptflow.stage.{stage}"] == "executed"
        assert second_run.data.tags[f"gptflow.stage.{stage}"] == "cached"
    assert first_run.info.status == second_run.info.status == "FINISHED"
    assert second_run.data.tags["gptflow.trained_in_run"] == first_run.info.run_id

    params = first_run.data.params
    assert params["preset"] == "tiny"
    assert params["model.n_layer"] == "2" and params["train.max_steps"] == "30"
    assert params["tokenizer.vocab_size"] == "512" and params["model.padded_vocab_size"] == "512"
    assert first_run.data.tags["prefect.flow_run_id"]
    assert first_run.data.tags["gptflow.precision"] == "float32"  # train.dtype=auto, on a CPU

    train_loss = client.get_metric_history(first_run.info.run_id, "train/loss")
    assert [m.step for m in train_loss] == list(range(5, 31, 5))
    assert train_loss[-1].value < train_loss[0].value
    assert [m.step for m in client.get_metric_history(first_run.info.run_id, "val/loss")] == [15, 30]
    for run in (first_run, second_run):
        metrics = run.data.metrics
        assert metrics["eval/val_loss"] > 0 and metrics["eval/bits_per_byte"] > 0
        assert metrics["eval/perplexity"] == pytest.approx(2.718281828 ** metrics["eval/val_loss"], rel=1e-6)
        assert int(run.data.params["dataset.train_tokens"]) > 0 and int(run.data.params["dataset.documents"]) > 0
        assert not [name for name in metrics if name.startswith("data/")]  # counts are params, not charts
        # The corpus as the run's dataset: its fingerprint, source and counts.
        [dataset_input] = run.inputs.dataset_inputs
        profile = json.loads(dataset_input.dataset.profile)
        assert profile["fingerprint"] == run.data.params["data_fingerprint"]
        assert dataset_input.dataset.digest == profile["fingerprint"][:8]
        assert json.loads(dataset_input.dataset.source) == {"uri": str(tiny_corpus_dir)}
        assert profile["train_tokens"] == int(run.data.params["dataset.train_tokens"])
        assert [(tag.key, tag.value) for tag in dataset_input.tags] == [("mlflow.data.context", "training")]
    assert first_run.data.metrics["eval/val_loss"] == second_run.data.metrics["eval/val_loss"]

    first_artifacts = artifact_paths(client, first_run.info.run_id)
    model_files = ("MLmodel", "artifacts/final/model.safetensors", "artifacts/final/config.json",
                   "artifacts/tokenizer.json")
    for expected in ("tokenizer/tokenizer.json", *(f"gptflow-tiny/{path}" for path in model_files),
                     "eval/report.json", "eval/samples.md", "loss_curve.png"):
        assert expected in first_artifacts
    # The store's integrity records stay in the store (the model keeps its own: it keys what is computed from it).
    assert not [path for path in first_artifacts if path.endswith("contents.json") and not path.startswith("gptflow-")]
    assert any(path.startswith("data/corpus-") for path in first_artifacts)
    assert any(path.startswith("data/tokens-") for path in first_artifacts)
    # The cached run carries the small artifacts again but points to the first run for the weights.
    second_artifacts = artifact_paths(client, second_run.info.run_id)
    assert "eval/report.json" in second_artifacts and "gptflow-tiny/MLmodel" not in second_artifacts
    assert first_run.data.tags["gptflow.registered_model"] == second_run.data.tags["gptflow.registered_model"]
    assert first_run.data.tags["gptflow.registered_model"] == "gptflow-tiny/1"
    assert (workspace / "mlartifacts").is_dir()

    # What the UIs show: runs named alike in MLflow and Prefect, the experiment opening on its runs,
    # the model a logged model of the run that trained it.
    assert first_run.info.run_name == f"pretrain tiny {tiny_corpus_dir.name}"
    with get_client(sync_client=True) as prefect:
        assert prefect.read_flow_run(first_run.data.tags["prefect.flow_run_id"]).name == first_run.info.run_name
        [summary] = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["pretrain-summary"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[first_run.data.tags["prefect.flow_run_id"]])))
    assert "| registered model | `models:/gptflow-tiny/1` |" in summary.data
    experiment = client.get_experiment(first_run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    _assert_model_described(client, first_run, second_run)


def _assert_model_described(client: MlflowClient, first_run, second_run) -> None:
    """The model is a logged model of the run that trained it, named, described, with its
    settings, metrics and dataset; the run that reused the training shows that model, that run
    and its curves."""
    [output] = first_run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.source_run_id == first_run.info.run_id and model.name == "gptflow-tiny"
    assert re.fullmatch(r"Text generator: a GPT of [\d.]+K parameters \(2 layers, 64 wide, 64-token context\), "
                        r"pretrained for 30 steps on [\d.]+K tokens\.", model.tags["mlflow.note.content"])
    assert client.get_model_version("gptflow-tiny", "1").description == model.tags["mlflow.note.content"]
    assert {name: model.params[name] for name in ("preset", "model.n_layer", "train.max_steps")} == {
        "preset": "tiny", "model.n_layer": "2", "train.max_steps": "30"}
    assert model.params["weights_hash"] and not [name for name in model.params if name.startswith("eval.")]
    assert {metric.key for metric in model.metrics} >= {"eval/val_loss", "eval/perplexity"}  # in the Models tab
    [dataset_input] = first_run.inputs.dataset_inputs
    assert {(metric.dataset_name, metric.dataset_digest) for metric in model.metrics} == {
        (dataset_input.dataset.name, dataset_input.dataset.digest)}  # the page's "Datasets used"
    assert not second_run.outputs.model_outputs
    # search_runs leaves model inputs out: get_run has them.
    reused = client.get_run(second_run.info.run_id).inputs.model_inputs
    assert [model_input.model_id for model_input in reused] == [model.model_id]
    trained_by = first_run.info.run_id
    assert f"/runs/{trained_by}?" in second_run.data.tags["mlflow.note.content"]
    assert "gptflow.trained_in_run" not in first_run.data.tags
    curves = [[(point.step, point.value) for point in client.get_metric_history(run.info.run_id, "val/loss")]
              for run in (first_run, second_run)]
    assert curves[0] == curves[1] and len(curves[0]) == 2


def test_editing_code_that_only_evaluation_reaches_reruns_evaluation_alone(cli_env, tiny_corpus_dir, gptflow_copy):
    env = {**cli_env, "PYTHONPATH": str(gptflow_copy)}  # this copy of gptflow runs, and is edited
    args = ("pretrain", "--corpus", str(tiny_corpus_dir), "--preset", "tiny")
    first = _gptflow(*args, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # model/classifier.py: no stage module imports it; evaluation reaches it through the model
    # source (tasks/stages/evaluation.py → tasks/model_source.py → model/classifier.py), training does not.
    classifier = gptflow_copy / "gptflow" / "model" / "classifier.py"
    classifier.write_text(classifier.read_text() + "\n\nHEAD_EDITED = True\n")  # code: a comment would rerun nothing
    second = _gptflow(*args, env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    _, (first_run, second_run) = _runs_oldest_first(Path(cli_env["GPTFLOW_HOME"]))
    assert {stage: second_run.data.tags[f"gptflow.stage.{stage}"] for stage in STAGES} == {
        "ingest": "cached", "tokenizer": "cached", "tokenize": "cached", "pretrain": "cached", "evaluate": "executed"}
    assert first_run.data.params["code_version"] != second_run.data.params["code_version"]


def test_one_large_text_file_trains_and_validates_as_it_is(cli_env, tmp_path, stdlib_text):
    book = tmp_path / "book.txt"
    book.write_text(stdlib_text(600_000))
    result = _gptflow("pretrain", "--corpus", str(book), "--preset", "tiny", env=cli_env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    cut = re.search(r"^val +5% of documents and of segments of documents over 4,096 chars, by hash "
                    r"\(book\.txt cut into (\d+) segments\)$", result.stdout, re.MULTILINE)
    assert cut and int(cut[1]) > 100, result.stdout[-3000:]
    _, (run,) = _runs_oldest_first(Path(cli_env["GPTFLOW_HOME"]))
    assert run.data.params["dataset.documents"] == "1" and int(run.data.params["dataset.segments"]) > 100
    assert run.data.metrics["eval/val_loss"] > 0
    assert "\nwarning " not in result.stdout  # ~10K val tokens: many batches of 8 windows of 64


def test_a_val_split_under_one_batch_of_windows_is_warned_of_with_the_settings_that_fix_it(cli_env, tiny_corpus_dir):
    # The tiny corpus's val split (~10K tokens) fills less than one batch of 8 windows of 2,048 tokens.
    result = _gptflow("pretrain", "--corpus", str(tiny_corpus_dir), "--preset", "tiny",
                      "--set", "model.block_size=2048", "--set", "train.max_steps=2", env=cli_env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    warning = re.search(r"^warning +val holds ([\d,]+) tokens, fewer than one batch of validation windows "
                        r"\(train.micro_batch_size x model.block_size = 8 x 2048 = 16,384\), too few for its loss "
                        r"to measure the model. Give val more text: raise --set data.val_fraction=<fraction> "
                        r"\(now 0.05\), or lower --set data.segment_chars=<chars> \(now 4,096\)", result.stdout,
                        re.MULTILINE)
    assert warning and 0 < int(warning[1].replace(",", "")) < 16_384, result.stdout[-3000:]
    assert f"pretrain: val holds {warning[1]} tokens" in result.stderr  # in the flow run's log too


def test_a_lost_mlflow_store_gets_the_cached_model_logged_and_registered_again(cli_env, tiny_corpus_dir):
    args = ("pretrain", "--corpus", str(tiny_corpus_dir), "--preset", "tiny")
    workspace = Path(cli_env["GPTFLOW_HOME"])
    assert _gptflow(*args, env=cli_env).returncode == 0
    (workspace / "mlflow.db").unlink()
    shutil.rmtree(workspace / "mlartifacts")
    rerun = _gptflow(*args, env=cli_env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "the tracking store lacks the model gptflow-tiny/1" in rerun.stdout + rerun.stderr
    _, (run,) = _runs_oldest_first(workspace)
    assert {run.data.tags[f"gptflow.stage.{stage}"] for stage in STAGES} == {"cached"}
    # The run logged the model again and registered it: the registry serves it.
    assert "gptflow.trained_in_run" not in run.data.tags
    assert run.data.tags["gptflow.registered_model"] == "gptflow-tiny/1"
    generated = _gptflow("generate", "--model", "models:/gptflow-tiny/1", "--prompt", "def ", "--max-new-tokens", "4",
                         env=cli_env)
    assert generated.returncode == 0 and generated.stdout.startswith("def "), generated.stderr[-3000:]
    # Once the store holds it again, the next run finds it instead of registering it a third time.
    assert _gptflow(*args, env=cli_env).returncode == 0
    _, (_, again) = _runs_oldest_first(workspace)
    assert again.data.tags["gptflow.trained_in_run"] == run.info.run_id
    assert again.data.tags["gptflow.registered_model"] == "gptflow-tiny/1"


def test_without_a_prefect_server_its_state_stays_in_the_workspace(cli_env, tiny_corpus_dir, tmp_path):
    home = tmp_path / "home"
    env = {key: value for key, value in cli_env.items() if not key.startswith("PREFECT_")}
    env.update(HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    result = _gptflow("pretrain", "--corpus", str(tiny_corpus_dir), "--preset", "tiny", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    database = Path(cli_env["GPTFLOW_HOME"]) / "prefect-server" / "prefect.db"
    with sqlite3.connect(database) as connection:
        [(name,)] = connection.execute("select name from flow_run").fetchall()
        flow_run_log = [message for (message,) in connection.execute("select message from log where task_run_id "
                                                                     "is null")]
    assert name == f"pretrain tiny {tiny_corpus_dir.name}"
    # The server outlived the run's last log lines, which Prefect sends as the command exits.
    assert any("Finished in state Completed()" in message for message in flow_run_log), flow_run_log[-5:]
    assert not (home / ".prefect" / "prefect.db").exists()
    # The temporary server the command started (flows.temporary_server) ended with it.
    [server] = set(re.findall(r"View at (http://127\.0\.0\.1:\d+)/", result.stdout + result.stderr))
    assert not answers(f"{server}/api/health")


def test_after_a_lost_mlflow_store_a_run_names_no_run_the_store_lost(cli_env, tiny_corpus_dir, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus_dir, corpus)
    workspace = Path(cli_env["GPTFLOW_HOME"])
    # A short continuation on the new data: a few steps.
    args = ("pretrain", "--corpus", str(corpus), "--preset", "tiny", "--set", "incremental.extra_tokens=2048")
    first = _gptflow(*args, env=cli_env)
    # Read from the summary: a client of the store in this process would keep reading the deleted file.
    lost_run = re.search(r"^mlflow +run (\w+)$", first.stdout, re.MULTILINE)[1]
    (workspace / "mlflow.db").unlink()
    shutil.rmtree(workspace / "mlartifacts")
    shutil.copy2(Path(shutil.__file__), corpus / "shutil.py")  # new data: the run names its previous run, if any

    healed = _gptflow(*args, env=cli_env)
    assert healed.returncode == 0, healed.stdout[-3000:] + healed.stderr[-3000:]
    assert f"the tokenizer kept for this corpus came from run {lost_run}, which the MLflow store no longer " \
           "holds" in healed.stdout + healed.stderr
    client, (run,) = _runs_oldest_first(workspace)
    assert run.data.tags["gptflow.data_change"].startswith("1 file added")
    assert run.data.tags["gptflow.training"] == "continued", run.data.tags
    assert "gptflow.previous_run" not in run.data.tags and "gptflow.continues_run" not in run.data.tags
    assert run.data.tags["gptflow.tokenizer.origin"] == f"reused from run {run.info.run_id[:8]}"
    assert lost_run[:8] not in " ".join(run.data.tags.values())

    _gptflow(*args, env=cli_env)  # the next run links to the runs the new store holds
    _, (_, after) = _runs_oldest_first(workspace)
    assert after.data.tags["gptflow.tokenizer.origin"] == f"reused from run {run.info.run_id[:8]}"


def test_missing_corpus_path_is_one_clear_line(cli_env, tmp_path):
    missing = tmp_path / "no-such-folder"
    result = _gptflow("pretrain", "--corpus", str(missing), "--preset", "tiny", env=cli_env)
    assert result.returncode == 2
    assert str(missing) in result.stderr and "Traceback" not in result.stderr
    assert not (Path(cli_env["GPTFLOW_HOME"]) / "store").exists()


def test_a_full_disk_is_one_line_leaves_nothing_partial_and_the_rerun_reuses_completed_stages(
    cli_env, tiny_corpus_dir, file_size_limit
):
    # Weights of ~4 MB (n_embd 192) cannot be written under a 2 MiB limit, while the raw and token
    # shards (~100 KB each) and the MLflow store (~1 MB) can: the data stages complete, and the first
    # checkpoint (step 15) runs out of space.
    args = ("pretrain", "--corpus", str(tiny_corpus_dir), "--preset", "tiny", "--set", "model.n_embd=192")
    full = _gptflow(*args, env=cli_env, preexec_fn=file_size_limit(2 * 2**20))
    assert full.returncode == 2, full.stdout[-3000:] + full.stderr[-3000:]
    assert "Traceback" not in full.stdout + full.stderr, full.stdout[-3000:] + full.stderr[-3000:]
    [error] = [line for line in full.stderr.splitlines() if line.startswith("gptflow: error:")]
    store = Path(cli_env["GPTFLOW_HOME"]) / "store"
    written = re.search(r"stage pretrain-model: out of space writing (\S+): a file reached the file size limit", error)
    assert written, error
    assert Path(written[1]).parent.parent.parent == store / "runs" and Path(written[1]).name == "step-00000015"
    assert "free on the filesystem at" in error and "rerun the same command: completed stages are reused" in error

    assert not list(store.rglob(".tmp-*"))
    data_artifacts = [path for kind in ("raw", "tokens", "tokenizers") for path in (store / kind).iterdir()]
    assert data_artifacts and all(is_complete(path) for path in data_artifacts)
    assert not [path for path in (store / "runs").rglob("*") if path.is_file()]  # no weights, not even partial

    rerun = _gptflow(*args, env=cli_env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    _, (failed_run, completed_run) = _runs_oldest_first(Path(cli_env["GPTFLOW_HOME"]))
    assert failed_run.info.status == "FAILED"
    assert {stage: failed_run.data.tags.get(f"gptflow.stage.{stage}") for stage in STAGES} == {
        "ingest": "executed", "tokenizer": "executed", "tokenize": "executed", "pretrain": None, "evaluate": None}
    assert {stage: completed_run.data.tags[f"gptflow.stage.{stage}"] for stage in STAGES} == {
        "ingest": "cached", "tokenizer": "cached", "tokenize": "cached", "pretrain": "executed", "evaluate": "executed"}
    assert [path for path in (store / "runs").glob("*/final") if is_complete(path)]


@pytest.mark.parametrize("small_tmpfs", [3 * 2**20], indirect=True)
def test_a_full_tmpfs_holding_the_mlflow_store_is_one_line_that_says_what_became_of_the_run(
    cli_env, tiny_corpus_dir, small_tmpfs
):
    # 3 MiB holds the MLflow store (~1 MB), the raw shards and the tokenizer (~1.4 MB), not the token
    # shards too (~1.3 MB): tokenize fills the disk, and the MLflow store on it can no longer be written.
    env = {**cli_env, "GPTFLOW_HOME": str(small_tmpfs)}
    args = ("pretrain", "--corpus", str(tiny_corpus_dir), "--preset", "tiny")
    full = _gptflow(*args, env=env)
    output = full.stdout + full.stderr
    assert full.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "sqlite3" not in output and len(output.splitlines()) < 25, output[-5000:]
    [error] = [line for line in full.stderr.splitlines() if line.startswith("gptflow: error:")]
    assert error.startswith(f"gptflow: error: stage tokenize-corpus: out of space writing {small_tmpfs}/store/tokens/")
    client, [failed] = _runs_oldest_first(small_tmpfs)
    # How little space is left decides how far the run's end gets: the store, else the outbox (with a
    # warning), else the error line says so.
    kept = f"has no space left to store the run's end: 1 operations of run {failed.info.run_id}" in output
    left_running = f"MLflow run {failed.info.run_id} is left RUNNING" in error
    assert failed.info.status == ("RUNNING" if kept or left_running else "FAILED"), output[-3000:]

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)  # space freed
    rerun = _gptflow(*args, env=env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert client.get_run(failed.info.run_id).info.status == ("KILLED" if left_running else "FAILED")
    _, (_, completed_run) = _runs_oldest_first(small_tmpfs)
    assert [completed_run.data.tags[f"gptflow.stage.{stage}"] for stage in ("ingest", "tokenizer")] == ["cached"] * 2


def test_nproc_trains_data_parallel_through_torchrun(cli_env, tiny_corpus_dir):
    result = _gptflow("pretrain", "--corpus", str(tiny_corpus_dir), "--preset", "tiny", "--nproc", "2", env=cli_env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "launching 2 processes" in result.stdout + result.stderr
    client, (run,) = _runs_oldest_first(Path(cli_env["GPTFLOW_HOME"]))
    assert run.data.params["train.nproc"] == "2"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == list(range(5, 31, 5))  # rank 0 alone reported
    assert run.data.tags["gptflow.registered_model"] == "gptflow-tiny/1"


def test_a_data_mixture_trains_logs_its_weights_and_another_mixture_reuses_the_data_stages(
    cli_env, tiny_corpus_dir, tmp_path
):
    files = sorted(tiny_corpus_dir.iterdir())
    for source, share in (("a", files[: len(files) // 2]), ("b", files[len(files) // 2 :])):
        (tmp_path / source).mkdir()
        for file in share:
            shutil.copy2(file, tmp_path / source / file.name)

    def pretrain(weight_a: str, weight_b: str) -> None:
        result = _gptflow("pretrain", "--corpus", f"{tmp_path / 'a'}={weight_a}", "--corpus",
                          f"{tmp_path / 'b'}={weight_b}", "--preset", "tiny", "--set", "train.max_steps=6", env=cli_env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    pretrain("0.8", "0.2")
    pretrain("0.5", "0.5")
    _, (first, second) = _runs_oldest_first(Path(cli_env["GPTFLOW_HOME"]))
    assert (first.data.params["data.mixture.a"], first.data.params["data.mixture.b"]) == ("0.8", "0.2")
    assert (second.data.params["data.mixture.a"], second.data.params["data.mixture.b"]) == ("0.5", "0.5")
    assert {stage: first.data.tags[f"gptflow.stage.{stage}"] for stage in STAGES} == dict.fromkeys(STAGES, "executed")
    # The weights are no part of the sources: the data stages are shared, and only training differs.
    assert {stage: second.data.tags[f"gptflow.stage.{stage}"] for stage in STAGES} == {
        "ingest": "cached", "tokenizer": "cached", "tokenize": "cached", "pretrain": "executed", "evaluate": "executed"}
    assert second.data.tags["gptflow.training"] == "from_scratch"
    assert "gptflow.trained_in_run" not in second.data.tags
    assert first.data.params["data_fingerprint"] == second.data.params["data_fingerprint"]
    [dataset_input] = first.inputs.dataset_inputs
    assert dataset_input.dataset.name == "a b"
