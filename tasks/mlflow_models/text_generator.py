"""A gptflow model as an MLflow pyfunc model that generates text.

This file is an MLflow "model from code": it is copied into every logged model and executed when
the model loads, with gptflow's pure packages (``model/``, ``data/``) copied beside it, so
``mlflow.pyfunc.load_model(uri).predict(["def parse("])`` works with only torch, tokenizers,
safetensors and pyarrow installed, gptflow itself not needed. It imports nothing from ``tasks/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class GptflowTextGenerator(PythonModel):
    """Prompts in, prompt + continuation out; ``params`` set the sampling."""
    # predict's input has no type hint on purpose: MLflow would build the signature from it and drop
    # the logged one (and its sampling params). This opts out of MLflow's type-hint validation, and of
    # the warning it prints about an unhinted predict wherever the model loads.
    _skip_type_hint_validation = True


    def load_context(self, context: Any) -> None:
        from gptflow.data.tokenizer import load_tokenizer
        from gptflow.model.checkpoint import load_model

        self.model = load_model(Path(context.artifacts["model"]))
        self.tokenizer = load_tokenizer(Path(context.artifacts["tokenizer"]))

    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> list[str]:  # noqa: ANN001
        from gptflow.model.config import SamplingConfig
        from gptflow.model.generate import generate_texts, input_texts

        # MLflow fills the params a caller leaves out with the logged signature's defaults.
        return generate_texts(self.model, self.tokenizer, input_texts(model_input, "prompt"),
                              SamplingConfig(**(params or {})))


mlflow.models.set_model(GptflowTextGenerator())
