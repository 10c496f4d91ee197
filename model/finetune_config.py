"""Settings of a fine-tuning run: data preparation, LoRA, optimisation, validation and samples.

Kept apart from ``model.finetune`` so that reading and validating them (the CLI does, before
anything starts) needs no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gptflow.data.config import require
from gptflow.data.finetune_data import OVERLONG_POLICIES
from gptflow.model.config import TrainConfig

DATA_FIELDS = ("max_length", "overlong", "val_fraction")
"""Fields read by data preparation."""
CLASSIFICATION_DATA_FIELDS = (*DATA_FIELDS, "text_field", "label_field")
"""Fields read by data preparation for classification."""
SAMPLING_FIELDS = ("samples", "max_new_tokens", "temperature", "top_k")
"""Fields read by the evaluation of sft models only."""


@dataclass
class FinetuneConfig:
    lora_rank: int = 8
    """Rank of the LoRA update of every attention and MLP matrix; 0 fine-tunes every weight."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the update is ``(lora_alpha / lora_rank) · B A``."""
    lora_dropout: float = 0.05
    """Dropout on the input of each LoRA update (training only)."""
    learning_rate: float = 3e-3
    """Peak learning rate (AdamW), reached after warmup. LoRA and small models take larger rates
    than full fine-tuning of large ones (~1e-5 to 1e-4)."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine decay, as a fraction of the peak."""
    warmup_steps: int = 10
    """Steps of linear warmup."""
    weight_decay: float = 0.0
    """Decoupled weight decay of matrices. 0 by default: a LoRA update or a short fine-tune
    should stay close to the base model, and decaying full weights pulls them to 0, not to it."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    max_steps: int = 150
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Examples per forward/backward pass."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    max_length: int | None = None
    """Tokens per example (template and start token included); None: the base model's block_size,
    which is also the most it can be."""
    overlong: str = "truncate"
    """Examples longer than ``max_length``: ``truncate`` (keep the start; an sft example whose
    response would lose every token is skipped) or ``skip``. Both are counted and reported."""
    val_fraction: float = 0.1
    """Share of the examples held out for validation, chosen by record hash; ignored when a
    separate validation file is given."""
    text_field: str = "text"
    """Classification: the field (JSONL) or column (CSV) holding the text."""
    label_field: str = "label"
    """Classification: the field or column holding the label."""
    seed: int = 0
    """Seeds the head and LoRA initialisation, the example order and dropout."""
    log_interval: int = 10
    """Steps between training-metric reports."""
    eval_interval: int = 50
    """Steps between validation passes (always before the first step and after the last); 0:
    only those two."""
    samples: int = 4
    """sft: validation prompts answered by the fine-tuned model, in ``samples.md``."""
    max_new_tokens: int = 128
    """sft: the most tokens generated per answer (generation stops at the end token)."""
    temperature: float = 0.7
    """sft: sampling temperature of the answers."""
    top_k: int = 20
    """sft: sample among the k most likely tokens; 0 disables the cut."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "micro_batch_size", "grad_accum_steps", "log_interval"):
            require(getattr(self, name) > 0, f"finetune.{name} must be positive, got {getattr(self, name)}")
        for name in ("lora_rank", "warmup_steps", "eval_interval", "samples", "max_new_tokens", "top_k", "seed"):
            require(getattr(self, name) >= 0, f"finetune.{name} must be >= 0, got {getattr(self, name)}")
        require(self.lora_alpha > 0, f"finetune.lora_alpha must be positive, got {self.lora_alpha}")
        require(0.0 <= self.lora_dropout < 1.0, f"finetune.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        require(self.learning_rate > 0, f"finetune.learning_rate must be positive, got {self.learning_rate}")
        require(0.0 <= self.min_lr_ratio <= 1.0, f"finetune.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        require(self.weight_decay >= 0, f"finetune.weight_decay must be >= 0, got {self.weight_decay}")
        require(self.grad_clip >= 0, f"finetune.grad_clip must be >= 0, got {self.grad_clip}")
        require(self.max_length is None or self.max_length >= 2,
                 f"finetune.max_length must be at least 2 tokens, got {self.max_length}")
        require(self.overlong in OVERLONG_POLICIES,
                 f"finetune.overlong must be one of {', '.join(OVERLONG_POLICIES)}, got {self.overlong!r}")
        require(0.0 < self.val_fraction < 1.0, f"finetune.val_fraction must be in (0, 1), got {self.val_fraction}")
        require(bool(self.text_field) and bool(self.label_field), "finetune.text_field and label_field must be set")
        require(self.temperature > 0, f"finetune.temperature must be positive, got {self.temperature}")

    def data_settings(self, task: str) -> dict[str, Any]:
        """The fields that shape ``task``'s prepared examples."""
        names = CLASSIFICATION_DATA_FIELDS if task == "classification" else DATA_FIELDS
        return {name: getattr(self, name) for name in names}

    def training_settings(self) -> dict[str, Any]:
        """The fields that shape the fine-tuned weights (given the prepared examples)."""
        return {name: value for name, value in asdict(self).items() if name not in CLASSIFICATION_DATA_FIELDS + SAMPLING_FIELDS}

    def sampling(self) -> dict[str, float | int]:
        """sft answers' sampling settings, as the MLflow chat model's ``predict`` params take them."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_k": self.top_k,
                "seed": self.seed}

    def train_config(self) -> TrainConfig:
        """The pretraining config sharing this run's optimizer and schedule, for
        ``build_optimizer`` and ``learning_rate_at``."""
        return TrainConfig(
            max_steps=self.max_steps, micro_batch_size=self.micro_batch_size, grad_accum_steps=self.grad_accum_steps,
            learning_rate=self.learning_rate, min_lr_ratio=self.min_lr_ratio, warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay, grad_clip=self.grad_clip, seed=self.seed,
        )
