"""A mistyped command is refused before torch, Prefect, MLflow or pyarrow load (bench/startup.py times it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "prefect", "mlflow", "pyarrow")
# Runs the command in a fresh interpreter, then lists the heavy libraries it imported.
PROBE = (
    "import json, sys\n"
    "from gptflow.flows.cli import main\n"
    "status = main(sys.argv[1:])\n"
    f"print(json.dumps([status, sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))]))\n"
)


def _refuse(*arguments: str) -> tuple[int, list[str], str]:
    """The exit status, the heavy libraries imported and stderr of ``gptflow *arguments``."""
    probe = subprocess.run([sys.executable, "-c", PROBE, *arguments], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert probe.returncode == 0, probe.stderr
    status, imported = json.loads(probe.stdout.splitlines()[-1])
    return status, imported, probe.stderr


def test_a_mistyped_set_is_refused_in_one_line_without_heavy_imports(tmp_path):
    status, imported, stderr = _refuse("pretrain", "--set", "trian.max_steps=3", "--workspace", str(tmp_path))
    assert status == 2
    assert stderr.splitlines() == ["gptflow: error: --set overrides: pretrain takes data.*, tokenizer.*, tokenize.*, "
                                   "model.*, train.*, eval.*, sampling.*, incremental.* settings, not trian.*."]
    assert imported == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["pretrain", "--corpus", "{missing}"], "does not exist"),
        (["pretrain", "--config", "{missing}.toml"], "does not exist"),
        (["pretrain", "--eval-corpus", "{missing}"], "does not exist"),
        (["sweep", "--grid", "data.quality=none,c4", "--eval-corpus", "{missing}"], "does not exist"),
        (["pretrain", "--set", "train.max_steps=many"], "train.max_steps='many' is not a valid int"),
        (["pretrain", "--corpus", "x/=abc"], "--corpus x/=abc: the weight 'abc' is not a number"),
        (["pretrain", "--corpus", "x/=-1"], "--corpus x/=-1: a weight must be a positive finite number"),
        (["pretrain", "--corpus", "x/=0.8", "--corpus", "y/"], "--corpus y/ has no weight while --corpus x/=0.8 has one"),
        (["finetune", "--set", "finetune.overlong=wrap"], "finetune.overlong must be one of truncate, skip"),
        (["finetune", "--data", "{missing}.jsonl"], "does not exist"),
        (["evaluate", "--model", "any", "--set", "eval.tokens=4"], "eval.tokens is not a setting"),
        (["evaluate", "--model", "any", "--classification", "{missing}.csv"], "does not exist"),
        (["pretrain", "--ray", "127.0.0.1:1"], "--ray 127.0.0.1:1: nothing answers there"),
        (["pretrain", "--ray", "head-node"], "expected auto, HOST:PORT"),
        (["evaluate", "--model", "any", "--corpus", ".", "--ray", "127.0.0.1:1"], "nothing answers there"),
        (["pretrain", "--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
        (["pretrain", "--rdzv-endpoint", "node0:29500"], "give --nnodes N too"),
        (["pretrain", "--nnodes", "2", "--rdzv-endpoint", "node0"], "--rdzv-endpoint node0: expected HOST:PORT"),
        (["pretrain", "--nnodes", "2", "--rdzv-endpoint", "no-such-host.invalid:29500"], "has no address"),
        (["pretrain", "--nnodes", "2", "--nproc", "2", "--rdzv-endpoint", "127.0.0.1:29500"],
         "with --nnodes, give --nproc-per-node instead"),
        (["pretrain", "--nproc", "3", "--set", "train.global_batch_size=64", "--set", "train.micro_batch_size=8"],
         "train.global_batch_size=64 does not split into micro-steps of train.micro_batch_size x train.nproc = 8 x 3"),
        (["finetune", "--nproc", "3", "--set", "train.global_batch_size=16"], "does not split into micro-steps"),
        (["pretrain", "--init-from", "models:/gptflow-cpu/1", "--set", "model.n_layer=2"],
         "--init-from trains its model as it is: model.n_layer cannot be set with it."),
        (["sweep"], "A sweep needs at least one --grid"),
        (["sweep", "--grid", "train.learning_rat=1e-3,3e-3"], "train.learning_rat is not a setting"),
        (["sweep", "--grid", "train.max_steps=10,many"], "sweep point 2 (max_steps=many): --set overrides: "
         "train.max_steps='many' is not a valid int"),
        (["sweep", "--grid", "train.learning_rate="], "--grid train.learning_rate has an empty value"),
        (["sweep", "--scaling", "--grid", "model.n_layer=1,2,3"], "--scaling fits the loss against model size"),
        (["sweep", "--grid", "train.max_steps=10,20", "--set", "train.max_steps=5"], "both swept"),
        (["train-node", "--rdzv-endpoint", "127.0.0.1:29500"], "give --nnodes N too"),
        (["train-node", "--nnodes", "1", "--rdzv-endpoint", "127.0.0.1:29500"], "--nnodes must be at least 2"),
    ],
)
def test_bad_settings_and_paths_of_every_flow_are_refused_without_heavy_imports(tmp_path, arguments, message):
    missing = str(tmp_path / "missing")
    status, imported, stderr = _refuse(*(argument.format(missing=missing) for argument in arguments),
                                       "--workspace", str(tmp_path / "ws"))
    assert status == 2
    [line] = stderr.splitlines()
    assert line.startswith("gptflow: error: ") and message in line
    assert imported == []


def test_a_corpus_file_whose_read_fails_with_an_io_error_is_one_line_naming_it(tmp_path):
    (tmp_path / "failing.txt").symlink_to("/proc/self/mem")  # opens, then read() fails with EIO
    status, imported, stderr = _refuse("pretrain", "--corpus", str(tmp_path / "failing.txt"),
                                       "--workspace", str(tmp_path / "ws"))
    assert status == 2
    [line] = stderr.splitlines()
    assert line.startswith(f"gptflow: error: Corpus file '{tmp_path / 'failing.txt'}' cannot be read: reading it "
                           "fails with an I/O error")
    assert imported == []


def test_a_missing_url_blocklist_is_one_line_naming_it_before_anything_starts(tmp_path):
    missing = tmp_path / "blocked.txt"
    (tmp_path / "notes.txt").write_text("A corpus of one file.\n", encoding="utf-8")
    for command in (["pretrain"], ["sweep", "--grid", "train.learning_rate=1e-3,3e-3"],
                    ["evaluate", "--model", "any", "--corpus", str(tmp_path / "notes.txt")]):
        status, imported, stderr = _refuse(*command, "--set", f"data.url_blocklist={missing}",
                                           "--workspace", str(tmp_path / "ws"))
        assert status == 2
        assert stderr.splitlines() == [f"gptflow: error: data.url_blocklist: cannot read {missing} (No such file or "
                                       "directory). Give a UTF-8 text file of domains, one per line, or leave "
                                       "data.url_blocklist unset."]
        assert imported == []
    assert not (tmp_path / "ws").exists()


def test_an_unknown_preset_option_or_command_is_one_line_without_the_usage_text():
    for arguments, line in (
        (["pretrain", "--preset", "hueg"], "argument --preset: invalid choice: 'hueg' (choose from 'tiny', 'cpu', "
         "'cpu-gpt2', 'gpt2-124m', 'gpt2-124m-modern', 'gpt2-350m', 'gpt-1b'); `gptflow pretrain -h` lists what it "
         "takes."),
        (["pretrain", "--corpse", "texts/"], "unrecognized arguments: --corpse texts/; `gptflow -h` lists what it takes."),
    ):
        refused = subprocess.run([sys.executable, "-m", "gptflow.flows.cli", *arguments], cwd=ROOT, capture_output=True,
                                 text=True, timeout=120)
        assert refused.returncode == 2 and refused.stdout == ""
        assert refused.stderr.splitlines() == [f"gptflow: error: {line}"]


def test_a_workspace_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    status, _, stderr = _refuse("pretrain", "--preset", "tiny", "--workspace", str(tmp_path / "taken" / "ws"))
    assert status == 2
    assert stderr.splitlines() == [f"gptflow: error: The workspace {tmp_path / 'taken' / 'ws'} is a file, or lies "
                                   "inside one: pass a folder with --workspace (or GPTFLOW_HOME)."]


def test_a_corpus_in_a_missing_bucket_is_refused_in_one_line(tmp_path, s3_server, monkeypatch):
    for name, value in s3_server.items():  # the command's process inherits them
        monkeypatch.setenv(name, value)
    status, imported, stderr = _refuse("pretrain", "--corpus", "s3://gptflow-no-such-bucket/raw/",
                                       "--workspace", str(tmp_path / "ws"))
    assert status == 2
    assert stderr.splitlines() == ["gptflow: error: Corpus URL 's3://gptflow-no-such-bucket/raw/': its bucket "
                                   "'gptflow-no-such-bucket' does not exist. Check the URL, or create the bucket."]
    assert imported == []


def test_a_workspace_in_a_missing_bucket_is_refused_in_one_line(tmp_path, s3_server, monkeypatch):
    for name, value in s3_server.items():  # the command's process inherits them
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GPTFLOW_CACHE", str(tmp_path / "cache"))
    status, imported, stderr = _refuse("pretrain", "--preset", "tiny", "--workspace", "s3://gptflow-no-such-bucket/ws")
    assert status == 2
    assert stderr.splitlines() == ["gptflow: error: The workspace s3://gptflow-no-such-bucket/ws: its bucket does not "
                                   "exist. Create it, or pass another --workspace."]
    assert imported == []


def test_a_damaged_stack_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "stack.json").write_text("{not json")
    status, _, stderr = _refuse("down", "--workspace", str(tmp_path))
    assert status == 2
    assert stderr.startswith(f"gptflow: error: {tmp_path / 'stack.json'} is not a stack file gptflow wrote")


def test_an_error_gptflow_cannot_explain_keeps_its_traceback_in_the_workspace(tmp_path, monkeypatch, capsys):
    from gptflow.flows import cli, commands

    def broken(args):  # a fault injected into the command itself: what is tested is how it is reported
        raise RuntimeError("something gptflow did not expect")

    monkeypatch.setattr(commands, "run_down", broken)
    assert cli.main(["down", "--workspace", str(tmp_path)]) == 1
    first, second = capsys.readouterr().err.splitlines()
    assert first == "gptflow: error: RuntimeError: something gptflow did not expect"
    [kept] = (tmp_path / "logs").glob("error-*.log")
    assert str(kept) in second and "--debug" in second
    assert "Traceback" in kept.read_text() and "something gptflow did not expect" in kept.read_text()
    with pytest.raises(RuntimeError):
        cli.main(["--debug", "down", "--workspace", str(tmp_path)])


def test_presets_lists_each_parameter_count_and_memory_per_gpu_without_heavy_imports():
    probe = subprocess.run([sys.executable, "-c", PROBE, "presets", "--gpus", "4"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    *printed, outcome = probe.stdout.splitlines()
    assert json.loads(outcome) == [0, []]
    summaries = {line.split(":")[0]: line for line in printed if line and not line.startswith(" ")}
    assert summaries["gpt-1b"].startswith("gpt-1b: 1.32B parameters; per GPU ")
    assert "with fsdp on 4" in summaries["gpt-1b"] and "recomputed" in summaries["gpt-1b"]
    assert summaries["gpt-1b"].endswith("trains with fsdp")
    assert summaries["gpt2-124m"].startswith("gpt2-124m: 124M parameters")
