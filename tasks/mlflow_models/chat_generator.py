"""A fine-tuned (sft) gptflow model as an MLflow pyfunc model that answers prompts.

An MLflow "model from code", like ``tasks/mlflow_models/text_generator.py``: copied into every logged model with
gptflow's pure packages (``model/``, ``data/``) beside it, so ``mlflow.pyfunc.load_model(uri)
.predict(["Write the function ..."])`` needs only torch, tokenizers, safetensors and pyarrow. Each
prompt is encoded as a user message with the model's own ``chat_template.json`` (as in training)
and answered until the template's end token. It imports nothing from ``tasks/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class GptflowChatModel(PythonModel):
    """Prompts in, the model's answers out (prompt not repeated); ``params`` set the sampling."""
    # predict's input has no type hint on purpose: MLflow would build the signature from it and drop
    # the logged one (and its sampling params). This opts out of MLflow's type-hint validation, and of
    # the warning it prints about an unhinted predict wherever the model loads.
    _skip_type_hint_validation = True


    def load_context(self, context: Any) -> None:
        from gptflow.data.chat import ChatTemplate
        from gptflow.data.tokenizer import load_tokenizer
        from gptflow.model.checkpoint import load_model

        self.model = load_model(Path(context.artifacts["model"]))
        self.tokenizer = load_tokenizer(Path(context.artifacts["tokenizer"]))
        self.template = ChatTemplate.load(Path(context.artifacts["chat_template"]))

    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> list[str]:  # noqa: ANN001
        from gptflow.data.chat import Message
        from gptflow.model.config import SamplingConfig
        from gptflow.model.finetune import answer
        from gptflow.model.generate import input_texts

        conversations = [[Message("user", prompt)] for prompt in input_texts(model_input, "prompt")]
        # MLflow fills the params a caller leaves out with the logged signature's defaults.
        return answer(self.model, self.tokenizer, self.template, conversations, SamplingConfig(**(params or {})))


mlflow.models.set_model(GptflowChatModel())
