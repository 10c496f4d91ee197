"""Settings of fine-tuning beyond the training loop's: LoRA, data preparation and evaluation.

The loop's own settings (steps, batch, learning rate and schedule, validation interval, seed) are
a ``TrainConfig``, as in pretraining, sampling is a ``SamplingConfig``, and how records are read
and split is ``data.config.RecordsConfig`` (``data.text_field``, ``data.label_field``,
``data.val_fraction``), as for every flow: the finetune flow composes the four. Kept apart from ``model.finetune`` so that reading and validating them (the
CLI does, before anything starts) needs no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gptflow.data.config import require
from gptflow.data.finetune_inputs import OVERLONG_POLICIES
from gptflow.data.tagging import SPAN_LABEL_FROM

LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout")
"""Fields that shape the fine-tuned weights (with the ``TrainConfig``)."""


@dataclass
class FinetuneConfig:
    lora_rank: int = 8
    """Rank of the LoRA update of every attention and MLP matrix; 0 fine-tunes every weight."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the update is ``(lora_alpha / lora_rank) · B A``."""
    lora_dropout: float = 0.05
    """Dropout on the input of each LoRA update (training only)."""
    max_length: int | None = None
    """Tokens per example (template and start token included); None: the base model's block_size,
    which is also the most it can be."""
    overlong: str = "truncate"
    """Examples longer than ``max_length``: ``truncate`` (keep the start; an sft example whose
    response would lose every token is skipped) or ``skip``. Both are counted and reported."""
    span_label_from: str = "each_token"
    """Tagging: where a span's label is read. ``each_token``: IOB2 tags, each token's from its own
    hidden state (which has read only the text up to it); ``last_token``: span edges on every
    token, the label at the span's last token, which has read the whole span."""
    samples: int = 4
    """sft: validation prompts answered by the fine-tuned model, in ``samples.md``."""

    def __post_init__(self) -> None:
        for name in ("lora_rank", "samples"):
            require(getattr(self, name) >= 0, f"finetune.{name} must be >= 0, got {getattr(self, name)}")
        require(self.lora_alpha > 0, f"finetune.lora_alpha must be positive, got {self.lora_alpha}")
        require(0.0 <= self.lora_dropout < 1.0, f"finetune.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        require(self.max_length is None or self.max_length >= 2,
                f"finetune.max_length must be at least 2 tokens, got {self.max_length}")
        require(self.overlong in OVERLONG_POLICIES,
                f"finetune.overlong must be one of {', '.join(OVERLONG_POLICIES)}, got {self.overlong!r}")
        require(self.span_label_from in SPAN_LABEL_FROM,
                f"finetune.span_label_from must be one of {', '.join(SPAN_LABEL_FROM)}, got {self.span_label_from!r}")

    def lora_settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in LORA_FIELDS}
