"""Fine-tuning settings (docs/method.md §2.3) and the constants shared by the fine-tuning modules."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fgbg_utils.core import rectangles

MODES = ("full", "lora")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
KINDS = ("full", "box", "fallback", "empty")
# config fields that may change between a checkpoint and the run resuming from it
RESUME_FREE = ("max_train_steps", "checkpoint_every", "gradient_checkpointing", "mixed_precision")


@dataclass
class FinetuneConfig:
    """Fine-tuning settings (docs/method.md §2.3). ``max_train_steps`` is required (docs/method.md §5.8)."""

    max_train_steps: int | None
    batch_size: int = 4                      # per device
    learning_rate: float = 1e-4              # constant, AdamW torch defaults (weight decay 0.01)
    p_full: float = 0.5
    loss_norm: str = "latent"                # "latent" (official) | "mask" [I]
    mode: str = "full"                       # "full" | "lora" [I]
    lora_rank: int = 4
    ema_decay: float = 0.9999
    use_ema: bool = True
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"              # "no" | "bf16" | "fp16"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 200
    seed: int = 0
    prompt_full: str = "a photo of a shape"
    prompt_background: str = "a photo of a background"
    hflip: bool = True

    def __post_init__(self):
        if self.max_train_steps is None or int(self.max_train_steps) < 1:
            raise ValueError(f"finetune.max_train_steps must be set to a positive number of optimizer "
                             f"steps (got {self.max_train_steps!r}); training is always bounded "
                             f"and the value is stored with the checkpoint (docs/method.md §5.8).")
        self.max_train_steps = int(self.max_train_steps)
        checks = [
            (self.batch_size >= 1, "finetune.batch_size must be >= 1"),
            (self.learning_rate > 0, "finetune.learning_rate must be > 0"),
            (0.0 <= self.p_full <= 1.0, "finetune.p_full must be in [0, 1]"),
            (self.loss_norm in rectangles.LOSS_NORMS,
             f"finetune.loss_norm must be one of {rectangles.LOSS_NORMS}"),
            (self.mode in MODES, f"finetune.mode must be one of {MODES}"),
            (self.lora_rank >= 1, "finetune.lora_rank must be >= 1"),
            (0.0 <= self.ema_decay <= 1.0, "finetune.ema_decay must be in [0, 1]"),
            (self.gradient_accumulation_steps >= 1, "finetune.gradient_accumulation_steps must be >= 1"),
            (self.mixed_precision in MIXED_PRECISIONS,
             f"finetune.mixed_precision must be one of {MIXED_PRECISIONS}"),
            (self.checkpoint_every >= 1, "finetune.checkpoint_every must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"{msg} (got {self})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

