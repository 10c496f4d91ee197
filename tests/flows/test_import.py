"""gptflow import: a transformers checkpoint built here (a small random Llama with grouped-query
attention, its tokenizer trained here without gptflow's special tokens) becomes a registered
gptflow model that computes the checkpoint's logits for its own ids, and that the other commands
take, pretraining continuing from it included; a Hub id offline is one clear line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gptflow.flows.cli import main
from gptflow.tasks.model_source import resolve_model
from gptflow.tasks.runtime.workspace import Workspace

pytestmark = pytest.mark.slow


@pytest.fixture
def checkpoint(tmp_path, stdlib_text):
    transformers = pytest.importorskip("transformers")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([stdlib_text(200_000)], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path / "tiny-llama"
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder, model, tokenizer


def test_an_imported_checkpoint_is_registered_computes_its_logits_and_generates(
    checkpoint, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder, original, tokenizer = checkpoint
    workspace = tmp_path / "ws"
    assert main(["import", "--model", str(folder), "--workspace", str(workspace)]) == 0
    output = capsys.readouterr().out
    assert "models:/gptflow-import-tiny-llama/1" in output and "added <|endoftext|>, <|pad|>" in output

    resolved = resolve_model("models:/gptflow-import-tiny-llama/1", Workspace.resolve(workspace))
    assert resolved.config.n_kv_head == 2 and resolved.config.vocab_size == 384  # 302 tokens, padded to 128s
    assert resolved.tokenizer.eot_id == 300 and resolved.tokenizer.pad_id == 301  # after the checkpoint's ids
    model = resolved.load()
    ids = torch.tensor([tokenizer.encode("def parse(text):\n    return text").ids])
    with torch.no_grad():
        ours, _ = model(ids, ids)
        theirs = original(ids).logits
    assert (ours[..., :300] - theirs[..., :300]).abs().max().item() <= 1e-4  # the tokenizer's own ids, unchanged
    # The new end-of-text token is the checkpoint's end token (</s>, id 1) to the model.
    torch.testing.assert_close(model.transformer.wte.weight[300], model.transformer.wte.weight[1])

    assert main(["generate", "--model", "models:/gptflow-import-tiny-llama/1", "--prompt", "def ",
                 "--max-new-tokens", "5", "--workspace", str(workspace)]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_a_hub_id_offline_and_a_folder_that_is_no_checkpoint_are_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GPTFLOW_HOME": str(tmp_path / "ws")}
    env.pop("MLFLOW_TRACKING_URI", None)
    for source, message in (("someone/some-model", "the Hugging Face Hub cannot be reached"),
                            (str(tmp_path), "has no config.json: point at a transformers checkpoint folder")):
        result = subprocess.run([sys.executable, "-m", "gptflow.flows.cli", "import", "--model", source],
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.splitlines()
        assert line.startswith("gptflow: error: ") and message in line


def test_an_architecture_gptflow_cannot_compute_is_refused_naming_the_nearest(checkpoint, tmp_path, capsys):
    folder, _, _ = checkpoint
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["MixtralForCausalLM"]}))
    assert main(["import", "--model", str(folder), "--workspace", str(tmp_path / "ws")]) == 2
    assert "nearest supported one is MistralForCausalLM" in capsys.readouterr().err


def test_pretraining_continues_from_an_imported_model_with_its_tokenizer_shape_and_weights(
    checkpoint, tmp_path, tiny_corpus_dir, prefect_api_url, monkeypatch, capsys
):
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from gptflow.flows.pretrain import pretrain

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder, _, _ = checkpoint
    workspace = tmp_path / "ws"
    corpus = shutil.copytree(tiny_corpus_dir, tmp_path / "corpus")
    assert main(["import", "--model", str(folder), "--workspace", str(workspace)]) == 0
    source = "models:/gptflow-import-tiny-llama/1"
    # A learning rate too small to move float32 weights: the trained model is the imported one.
    settings = {"train.max_steps": 2, "train.learning_rate": 1e-12, "train.warmup_steps": 1, "train.micro_batch_size": 2}
    summary = pretrain(corpus=[str(corpus)], preset="tiny", overrides=settings, workspace=str(workspace),
                       init_from=source)
    assert "tokenizer" not in summary.stages and summary.stages["pretrain"] == "executed"
    assert summary.training == "initialized"
    run = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}").get_run(summary.mlflow_run_id)
    assert run.data.tags["gptflow.init_from"] == source and run.data.params["model.n_kv_head"] == "2"
    resolved = resolve_model(source, Workspace.resolve(workspace))
    assert run.data.params["tokenizer_hash"] == resolved.tokenizer.hash
    imported = load_file(resolved.model_dir / "model.safetensors")
    [trained_dir] = (workspace / "store" / "runs").iterdir()
    trained = load_file(trained_dir / "final" / "model.safetensors")
    assert trained.keys() == imported.keys()
    for name, tensor in imported.items():
        torch.testing.assert_close(trained[name], tensor, atol=1e-6, rtol=1e-6, msg=name)

    again = pretrain(corpus=[str(corpus)], preset="tiny", overrides=settings, workspace=str(workspace),
                     init_from=source)
    assert again.stages["pretrain"] == "cached"
    # New data: the model trained from the import is continued on it, as any pretraining is.
    shutil.copyfile(Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py", corpus / "added-later.py")
    grown = pretrain(corpus=[str(corpus)], preset="tiny", overrides=settings, workspace=str(workspace),
                     init_from=source)
    assert grown.stages["pretrain"] == "executed" and grown.training == "continued"


def test_an_imported_model_fine_tunes_with_lora(checkpoint, tmp_path, monkeypatch):
    from gptflow.flows.finetune import finetune

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder, _, _ = checkpoint
    workspace = tmp_path / "ws"
    assert main(["import", "--model", str(folder), "--workspace", str(workspace)]) == 0
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {n} plus 1?", "response": str(n + 1)}) + "\n"
                            for n in range(24)))
    summary = finetune(objective="sft", model="models:/gptflow-import-tiny-llama/1", data=str(data),
                       overrides={"train.max_steps": 2, "train.micro_batch_size": 2, "finetune.lora_rank": 2,
                                  "finetune.samples": 1, "sampling.max_new_tokens": 4},
                       workspace=str(workspace))
    assert summary.stages["finetune"] == "executed" and summary.registered_model == "gptflow-finetune-sft/1"
    assert 0 < summary.trainable_parameters < summary.total_parameters


def test_a_tokenizer_larger_than_the_embedding_is_refused(checkpoint, tmp_path, capsys):
    folder, _, _ = checkpoint
    config = json.loads((folder / "config.json").read_text())
    # As if the folder held another model's tokenizer: 300 tokens for 256 embedding rows.
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 256}))
    import safetensors.torch

    weights = safetensors.torch.load_file(folder / "model.safetensors")
    safetensors.torch.save_file({name: tensor[:256].contiguous() if tensor.size(0) == 320 else tensor
                                 for name, tensor in weights.items()}, folder / "model.safetensors")
    assert main(["import", "--model", str(folder), "--workspace", str(tmp_path / "ws")]) == 2
    assert "has 300 tokens, more than the 256 embedding rows" in capsys.readouterr().err
