"""Text in, text out: a model's samples for prompts given as strings.

``GPT.generate`` and ``model.evaluate.generate_samples`` work on token ids; this adds the
tokenizer around them the way every gptflow entry point uses it (``gptflow generate``, the MLflow
model's ``predict``). A chat model (fine-tuned with ``--objective sft``, ``chat_template.json``
beside its tokenizer) is prompted through ``model.finetune.answer`` instead, as its MLflow chat
model is: the prompt as a user message, the answer cut at the template's end token.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer

from gptflow.data.tokenizer import EOT_TOKEN
from gptflow.model.config import SamplingConfig
from gptflow.model.evaluate import generate_samples
from gptflow.model.gpt import GPT


def generate_texts(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: list[str],
    sampling: SamplingConfig,
    device: torch.device | str = "cpu",
) -> list[str]:
    """Each prompt followed by up to ``sampling.max_new_tokens`` sampled tokens, decoded.

    A prompt is read after an end-of-text token, as every document starts in training, so an
    empty prompt samples the start of a document. Only the tokenizer's own ids are sampled, never
    the embedding's padding rows. Sampling is seeded by ``(sampling.seed, prompt index)``.
    """
    eot_id = tokenizer.token_to_id(EOT_TOKEN)
    prompt_ids = [[eot_id, *tokenizer.encode(prompt).ids] for prompt in prompts]
    generated = generate_samples(model, prompt_ids, sampling, device, vocab_limit=tokenizer.get_vocab_size())
    return [tokenizer.decode(ids[1:]) for ids in generated]


def input_texts(model_input: Any, column: str) -> list[str]:
    """The texts of an MLflow pyfunc model's input: a string, a list of strings, or a DataFrame
    (its ``column``, else its first column)."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):
        name = column if column in model_input.columns else model_input.columns[0]
        return [str(value) for value in model_input[name]]
    return [str(value) for value in model_input]
