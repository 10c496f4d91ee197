"""Checkpoints of every supported transformers architecture, built here from small random configs
(never downloaded), import into gptflow models that compute their logits, export back to folders
that compute them too, and what cannot be computed exactly is refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from gptflow.model.export import export_to_transformers
from gptflow.model.transformers_import import CheckpointImportError, load_transformers_model

# Logits may differ by float rounding only: attention and rotary kernels order the arithmetic differently.
MAX_LOGIT_DIFFERENCE = 1e-4
VOCAB = 384
SHAPE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "max_position_embeddings": 64}
CHECKPOINTS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"vocab_size": VOCAB, "n_positions": 64, "n_embd": 64, "n_layer": 2,
                                                "n_head": 4, "activation_function": "gelu_new",
                                                "layer_norm_epsilon": 1e-5}),
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", {**SHAPE, "num_key_value_heads": 2, "rope_theta": 500000.0,
                                                       "rms_norm_eps": 1e-5}),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", {**SHAPE, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**SHAPE, "num_key_value_heads": 1, "sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**SHAPE, "num_key_value_heads": 2, "use_sliding_window": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**SHAPE, "num_key_value_heads": 2, "head_dim": 32,
                                                   "tie_word_embeddings": True, "rope_theta": 1000000.0}),
}


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _checkpoint(transformers, case: str, directory):
    config_class, model_class, settings = CHECKPOINTS[case]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**settings)).eval()
    with torch.no_grad():  # norm gains and biases start at 1 and 0: make every parameter matter
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_an_imported_checkpoint_computes_its_logits_and_exports_back(transformers, bpe_tokenizer_file, tmp_path, case):
    original = _checkpoint(transformers, case, tmp_path / "hf")
    model = load_transformers_model(tmp_path / "hf")
    idx = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        expected = original(idx).logits
        ours, _ = model(idx, idx)
    assert (ours - expected).abs().max().item() <= MAX_LOGIT_DIFFERENCE
    assert model.num_parameters() == sum(parameter.numel() for parameter in original.parameters())

    export_to_transformers(model, bpe_tokenizer_file, tmp_path / "exported")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (exported(idx).logits - expected).abs().max().item() <= MAX_LOGIT_DIFFERENCE


def test_a_shorter_block_size_keeps_the_start_of_the_context(transformers, tmp_path):
    original = _checkpoint(transformers, "gpt2", tmp_path / "hf")
    model = load_transformers_model(tmp_path / "hf", block_size=16)
    assert model.config.block_size == 16
    idx = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert (model(idx, idx)[0] - original(idx).logits).abs().max().item() <= MAX_LOGIT_DIFFERENCE


def _edit_config(directory, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(("case", "changes", "message"), [
    ("llama-gqa", {"architectures": ["FalconForCausalLM"]}, "holds a FalconForCausalLM, which gptflow cannot compute"),
    ("llama-gqa", {"architectures": ["LlamaForSequenceClassification"]}, "nearest supported one is LlamaForCausalLM"),
    ("llama-gqa", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling 'llama3' is not computed"),
    ("mistral", {"sliding_window": 16}, "a sliding window of 16 tokens, shorter than the context of 64"),
    ("gpt2", {"activation_function": "relu"}, "activation_function 'relu' has no gptflow equivalent"),
])
def test_what_gptflow_cannot_compute_exactly_is_refused_by_name(transformers, tmp_path, case, changes, message):
    _checkpoint(transformers, case, tmp_path / "hf")
    _edit_config(tmp_path / "hf", **changes)
    with pytest.raises(CheckpointImportError, match=message):
        load_transformers_model(tmp_path / "hf")


def test_a_folder_without_config_or_safetensors_weights_says_what_to_do(transformers, tmp_path):
    with pytest.raises(CheckpointImportError, match="has no config.json: point at a transformers checkpoint folder"):
        load_transformers_model(tmp_path)
    _checkpoint(transformers, "gpt2", tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(CheckpointImportError, match="pickled weights, which gptflow does not unpickle"):
        load_transformers_model(tmp_path / "hf")
