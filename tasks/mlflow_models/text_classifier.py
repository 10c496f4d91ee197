"""A fine-tuned gptflow classifier as an MLflow pyfunc model: texts in, labels out.

An MLflow "model from code", like ``tasks/mlflow_models/text_generator.py``: copied into every logged model with
gptflow's pure packages (``model/``, ``data/``) beside it, so ``mlflow.pyfunc.load_model(uri)
.predict(["def parse(self): ..."])`` needs only torch, tokenizers, safetensors and pyarrow. Texts
are encoded and cut to the length the classifier was trained with, exactly as in training. It
imports nothing from ``tasks/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class GptflowClassifier(PythonModel):
    # predict's input has no type hint on purpose: MLflow would build the signature from it and drop
    # the logged one (and its sampling params). This opts out of MLflow's type-hint validation, and of
    # the warning it prints about an unhinted predict wherever the model loads.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from gptflow.data.tokenizer import EOT_TOKEN, PAD_TOKEN, load_tokenizer
        from gptflow.model.classifier import load_classifier

        self.classifier, self.max_length = load_classifier(
            Path(context.artifacts["model"]), Path(context.artifacts["classifier"])
        )
        self.tokenizer = load_tokenizer(Path(context.artifacts["tokenizer"]))
        self.start_id = self.tokenizer.token_to_id(EOT_TOKEN)
        self.pad_id = self.tokenizer.token_to_id(PAD_TOKEN)

    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> list[str]:  # noqa: ANN001
        import torch

        from gptflow.data.finetune_data import encode_text
        from gptflow.model.classifier import pad_right
        from gptflow.model.finetune import SCORE_BATCH_EXAMPLES
        from gptflow.model.generate import input_texts

        texts = input_texts(model_input, "text")
        labels: list[str] = []
        with torch.no_grad():
            for start in range(0, len(texts), SCORE_BATCH_EXAMPLES):
                ids = [encode_text(self.tokenizer, text, self.start_id)[: self.max_length]
                       for text in texts[start : start + SCORE_BATCH_EXAMPLES]]
                logits, _ = self.classifier(*pad_right(ids, self.pad_id))
                labels += [self.classifier.labels[index] for index in logits.argmax(dim=-1).tolist()]
        return labels


mlflow.models.set_model(GptflowClassifier())
