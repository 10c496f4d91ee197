"""A fine-tuned gptflow tagger as an MLflow pyfunc model: texts in, labelled spans out.

An MLflow "model from code", like ``tasks/mlflow_models/text_classifier.py``: copied into every logged model
with gptflow's pure packages beside it, so ``mlflow.pyfunc.load_model(uri).predict(["def f(x):
return x"])`` needs only torch, tokenizers, safetensors and pyarrow. Each text gets a list of
``{"start", "end", "label", "text"}`` (character offsets into it); texts are encoded and cut to
the length the tagger was trained with, exactly as in training. It imports nothing from ``tasks/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class GptflowTagger(PythonModel):
    # No type hint on predict's input: see tasks/mlflow_models/text_classifier.py.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from gptflow.data.tokenizer import load_tokenizer
        from gptflow.model.classifier import load_classifier

        self.tagger, self.max_length = load_classifier(
            Path(context.artifacts["model"]), Path(context.artifacts["classifier"])
        )
        self.tokenizer = load_tokenizer(Path(context.artifacts["tokenizer"]))

    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> list[list[dict[str, Any]]]:  # noqa: ANN001
        from gptflow.model.classifier import tag_texts
        from gptflow.model.generate import input_texts

        return tag_texts(self.tagger, self.tokenizer, input_texts(model_input, "text"), self.max_length)


mlflow.models.set_model(GptflowTagger())
