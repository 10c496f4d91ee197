"""`gptflow generate` and `gptflow export` on a model directory, as a user runs them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptflow.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from gptflow.flows.cli import main
from gptflow.flows.commands import SAMPLE_SEPARATOR
from gptflow.model.checkpoint import save_final
from gptflow.model.config import ModelConfig, pad_vocab_size
from gptflow.model.gpt import GPT

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bpe_tokenizer_file) -> Path:
    """A run directory as pretraining leaves it: final/ with the tokenizer beside it."""
    run = tmp_path_factory.mktemp("run")
    shutil.copyfile(bpe_tokenizer_file, run / TOKENIZER_FILE)
    vocab_size = pad_vocab_size(load_tokenizer(bpe_tokenizer_file).get_vocab_size())
    torch.manual_seed(0)
    return save_final(run, GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=vocab_size)))


def test_generate_continues_each_line_of_stdin_and_each_prompt(model_dir, tmp_path, capsys):
    arguments = ["generate", "--model", str(model_dir), "--max-new-tokens", "6", "--workspace", str(tmp_path / "ws")]
    piped = subprocess.run([sys.executable, "-m", "gptflow.flows.cli", *arguments], input="def parse(\nclass Decoder\n",
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert piped.returncode == 0, piped.stderr
    first, second = piped.stdout.removesuffix("\n").split(f"\n{SAMPLE_SEPARATOR}\n")
    assert first.startswith("def parse(") and len(first) > len("def parse(")
    assert second.startswith("class Decoder") and len(second) > len("class Decoder")

    assert main([*arguments, "--prompt", "class Decoder"]) == 0
    assert capsys.readouterr().out == second + "\n"  # a prompt's sample depends on the seed only


def test_generate_refuses_a_tokenizer_larger_than_the_model(model_dir, tmp_path, capsys):
    from tokenizers import Tokenizer, models

    words = {"<|endoftext|>": 0, "<|pad|>": 1, **{f"w{index}": index for index in range(2, 1000)}}
    big = Tokenizer(models.WordLevel(words, unk_token="w2"))
    big.save(str(tmp_path / "big.json"))
    assert main(["generate", "--model", str(model_dir), "--tokenizer", str(tmp_path / "big.json"),
                 "--prompt", "x", "--workspace", str(tmp_path / "ws")]) == 2
    assert "pass the tokenizer the model was trained with" in capsys.readouterr().err


def test_a_model_folder_put_together_by_hand_generates_and_a_pickle_in_it_is_one_line(model_dir, tmp_path, capsys):
    folder = tmp_path / "my-model"  # as the README describes one: weights, config and tokenizer, copied
    folder.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copyfile(model_dir / name, folder / name)
    shutil.copyfile(model_dir.parent / TOKENIZER_FILE, folder / TOKENIZER_FILE)
    arguments = ["generate", "--prompt", "def parse(", "--max-new-tokens", "6", "--workspace", str(tmp_path / "ws")]
    assert main([*arguments, "--model", str(model_dir)]) == 0
    from_run = capsys.readouterr().out
    assert main([*arguments, "--model", str(folder)]) == 0
    assert capsys.readouterr().out == from_run  # the same model, so the same sample

    torch.save({"weights": torch.zeros(2)}, folder / "model.safetensors", _use_new_zipfile_serialization=False)
    assert main([*arguments, "--model", str(folder)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"gptflow: error: {folder / 'model.safetensors'} is not a safetensors file (it is a "
                           "Python pickle)")


def test_export_writes_a_folder_once_and_names_its_architecture(model_dir, tmp_path, capsys):
    out, workspace = str(tmp_path / "hf"), str(tmp_path / "ws")
    arguments = ["export", "--model", str(model_dir), "--out", out, "--workspace", workspace]
    assert main(arguments) == 0
    assert "as GPT2LMHeadModel" in capsys.readouterr().out
    assert {path.name for path in (tmp_path / "hf").iterdir()} == {
        "config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json",
    }
    assert main(arguments) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
