"""An export loads with transformers and computes our logits; recipes it cannot express are refused.

transformers is an optional test dependency (the ``test`` extra): the tests that load an export
are skipped without it.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from gptflow.data.tokenizer import load_tokenizer
from gptflow.model.config import ModelConfig, pad_vocab_size
from gptflow.model.export import ExportError, export_to_transformers
from gptflow.model.gpt import GPT

LLAMA_RECIPE = {"position": "rotary", "norm": "rmsnorm", "mlp": "swiglu", "tie_embeddings": False}
EXPORTABLE = {
    "gpt2": ({}, "GPT2LMHeadModel"),
    "gpt2-bias-untied": ({"bias": True, "tie_embeddings": False}, "GPT2LMHeadModel"),
    "llama": (LLAMA_RECIPE, "LlamaForCausalLM"),
    "llama-bias-tied": ({**LLAMA_RECIPE, "bias": True, "tie_embeddings": True}, "LlamaForCausalLM"),
    "qwen3": ({**LLAMA_RECIPE, "qk_norm": True}, "Qwen3ForCausalLM"),
    # As modern checkpoints have them: grouped queries, heads wider than n_embd / n_head, their own
    # MLP width, rotary base and norm epsilon.
    "llama-gqa": ({**LLAMA_RECIPE, "n_kv_head": 2, "mlp_hidden": 96, "rope_theta": 500000.0, "norm_eps": 1e-6},
                  "LlamaForCausalLM"),
    "qwen3-gqa": ({**LLAMA_RECIPE, "qk_norm": True, "n_kv_head": 1, "head_dim": 32, "tie_embeddings": True,
                   "rope_theta": 1000000.0, "norm_eps": 1e-6}, "Qwen3ForCausalLM"),
    "gpt2-eps": ({"mlp_hidden": 100, "norm_eps": 1e-6}, "GPT2LMHeadModel"),
    "gpt2-tanh-gelu": ({"mlp": "gelu_tanh", "bias": True}, "GPT2LMHeadModel"),
    "qwen2": ({**LLAMA_RECIPE, "qkv_bias": True, "n_kv_head": 2}, "Qwen2ForCausalLM"),
}
# Logits of a float32 export may differ from ours by rounding only (measured: 0 for GPT-2, ~2e-6 for
# Llama and Qwen3, whose attention and rotary kernels order the arithmetic differently).
MAX_LOGIT_DIFFERENCE = 1e-4


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def random_model(tokenizer_file, **switches) -> GPT:
    """A small model sized for the tokenizer, every parameter (gains and biases too) random."""
    vocab_size = pad_vocab_size(load_tokenizer(tokenizer_file).get_vocab_size())
    config = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=vocab_size, **switches)
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("case", list(EXPORTABLE))
def test_transformers_computes_our_logits_and_greedy_tokens(transformers, bpe_tokenizer_file, tmp_path, case):
    switches, architecture = EXPORTABLE[case]
    model = random_model(bpe_tokenizer_file, **switches)
    assert export_to_transformers(model, bpe_tokenizer_file, tmp_path / "hf") == architecture

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(loaded).__name__ == architecture
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.block_size))
    with torch.no_grad():
        ours, _ = model(idx, idx)  # (2, T, V)
        theirs = loaded(idx).logits  # (2, T, V)
        # transformers' generate, with its own KV cache; it may stop early at end-of-text.
        their_tokens = loaded.generate(idx[:1, :4], max_new_tokens=12, do_sample=False, top_k=None, temperature=None)
    assert (ours - theirs).abs().max().item() <= MAX_LOGIT_DIFFERENCE
    our_tokens = model.generate(idx[:1, :4], 12, top_k=1)
    assert torch.equal(their_tokens, our_tokens[:, : their_tokens.size(1)])


def test_autotokenizer_gives_our_ids_and_special_tokens(transformers, bpe_tokenizer_file, tmp_path):
    export_to_transformers(random_model(bpe_tokenizer_file), bpe_tokenizer_file, tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = load_tokenizer(bpe_tokenizer_file)
    text = "def parse(text) :\n    return {'naïve': text , 'x': 1}  # ok .\n"
    ids = theirs(text)["input_ids"]
    assert ids == ours.encode(text).ids
    assert theirs.decode(ids) == text
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<|pad|>")
    assert (theirs.eos_token_id, theirs.pad_token_id) == (0, 1)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"] == 0 and generation["pad_token_id"] == 1


def test_gpt2_export_stores_conv1d_weights_transposed_and_zero_biases(bpe_tokenizer_file, tmp_path):
    model = random_model(bpe_tokenizer_file)
    export_to_transformers(model, bpe_tokenizer_file, tmp_path / "hf")
    weights = safetensors.torch.load_file(tmp_path / "hf" / "model.safetensors")
    c_attn = model.transformer.h[0].attn.c_attn.weight
    assert torch.equal(weights["transformer.h.0.attn.c_attn.weight"], c_attn.t())
    assert not weights["transformer.h.0.attn.c_attn.bias"].any()
    assert "lm_head.weight" not in weights  # tied: transformers ties it to the token embedding


@pytest.mark.parametrize(
    ("switches", "named"),
    [
        ({"position": "rotary", "norm": "rmsnorm", "qk_norm": True, "mlp": "relu2", "tie_embeddings": False,
          "logit_softcap": 15.0}, ["Qwen3ForCausalLM needs model.mlp=swiglu, model.logit_softcap=0.0"]),
        ({"mlp": "relu2"}, ["GPT2LMHeadModel", "model.mlp=gelu", "(the model has model.mlp=relu2)"]),
        ({"position": "rotary"}, ["GPT2LMHeadModel", "model.position=learned"]),
        ({"position": "sinusoidal"}, ["GPT2LMHeadModel", "model.position=learned", "(the model has model.position=sinusoidal)"]),
        ({**LLAMA_RECIPE, "qk_norm": True, "bias": True},
         ["LlamaForCausalLM needs model.qk_norm=false", "Or Qwen3ForCausalLM needs model.bias=false"]),
    ],
)
def test_recipes_without_an_equivalent_architecture_are_refused_by_name(bpe_tokenizer_file, tmp_path, switches, named):
    model = random_model(bpe_tokenizer_file, **switches)
    with pytest.raises(ExportError, match="not exportable yet") as refusal:
        export_to_transformers(model, bpe_tokenizer_file, tmp_path / "hf")
    assert all(part in str(refusal.value) for part in named), str(refusal.value)
    assert list(tmp_path.iterdir()) == []


def test_an_export_is_all_or_nothing_and_never_overwrites(bpe_tokenizer_file, tmp_path, monkeypatch):
    model = random_model(bpe_tokenizer_file)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_to_transformers(model, bpe_tokenizer_file, occupied)
    assert [path.name for path in occupied.iterdir()] == ["notes.txt"]

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        export_to_transformers(model, bpe_tokenizer_file, tmp_path / "hf")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["occupied"]  # no export, no temporary


def test_an_empty_directory_is_filled(bpe_tokenizer_file, tmp_path):
    (tmp_path / "hf").mkdir()
    export_to_transformers(random_model(bpe_tokenizer_file), bpe_tokenizer_file, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
