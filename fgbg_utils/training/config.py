"""The trainers' settings, each declared once with its default and doc: fine-tuning (docs/method.md
§2.3) and the segmentation U-Net (§2.6). The params file's sections extend these classes."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_REQUIRED = object()

MODES = ("full", "lora")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
KINDS = ("full", "box", "fallback", "empty")
# config fields that may change between a checkpoint and the run resuming from it
RESUME_FREE = ("max_train_steps", "checkpoint_every", "gradient_checkpointing", "mixed_precision")


def _yaml_no(value):
    """YAML reads a bare `no` as false: `mixed_precision: no` (file or --set) means "no"."""
    return "no" if value is False else value


class FinetuneSettings(BaseModel):
    """The fine-tuning settings, each declared once (the params file's `finetune` section extends
    this class). docs/method.md §2.3."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    max_train_steps: Optional[int] = Field(None, description="optimizer steps of stage 03 (required there)")
    batch_size: int = Field(4, ge=1, description="images per step and device [C: 3-4]")
    learning_rate: float = Field(1e-4, gt=0, description="constant AdamW learning rate [C]")
    p_full: float = Field(0.5, ge=0, le=1, description="share of full-image samples with y_f [C]")
    loss_norm: Literal["latent", "mask"] = Field("latent", description="latent (official) or mask [I]")
    mode: Literal["full", "lora"] = Field("full", description="full UNet or lora [I]")
    lora_rank: int = Field(4, ge=1, description="LoRA rank when mode is lora")
    ema_decay: float = Field(0.9999, ge=0, le=1, description="EMA decay [C]")
    use_ema: bool = Field(True, description="sample with EMA weights [C]")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="no, bf16 or fp16")
    gradient_checkpointing: bool = Field(False, description="trade compute for memory")
    use_8bit_adam: bool = Field(False, description="bitsandbytes 8-bit AdamW (needs the package)")
    checkpoint_every: int = Field(200, ge=1, description="steps between resumable checkpoints")
    hflip: bool = Field(True, description="random horizontal flip [C]")

    _mixed_precision_no = field_validator("mixed_precision", mode="before")(_yaml_no)


class FinetuneConfig(FinetuneSettings):
    """What the trainer runs with: the settings plus the seed and the two prompts.
    ``max_train_steps`` is required (docs/method.md §5.8)."""

    seed: int = 0
    prompt_full: str = "a photo of a shape"
    prompt_background: str = "a photo of a background"

    def __init__(self, max_train_steps=_REQUIRED, **kw):
        if max_train_steps is _REQUIRED:
            raise TypeError("FinetuneConfig needs max_train_steps")
        try:
            super().__init__(max_train_steps=max_train_steps, **kw)
        except ValidationError as e:
            err = e.errors()[0]
            raise ValueError(f"finetune.{'.'.join(map(str, err['loc']))}: {err['msg']} "
                             f"(got {err.get('input')!r})") from None

    @model_validator(mode="after")
    def _bounded(self):
        if self.max_train_steps is None or int(self.max_train_steps) < 1:
            raise ValueError(f"finetune.max_train_steps must be set to a positive number of optimizer "
                             f"steps (got {self.max_train_steps!r}); training is always bounded "
                             f"and the value is stored with the checkpoint (docs/method.md §5.8).")
        return self

    def to_dict(self) -> dict:
        return self.model_dump()



class SegSettings(BaseModel):
    """The segmentation U-Net's settings (docs/method.md §2.6)."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    size: int = Field(128, ge=8, description="input size (short side, crop) [C: 128]")
    base_width: int = Field(64, ge=1, description="width of the first level [C: 64]")
    depth: int = Field(4, ge=1, description="max-pool downs [C: 4]")
    steps: int = Field(12000, ge=1, description="Adam steps [C: 12,000]")
    batch_size: int = Field(32, ge=1, description="images per step [C: 32]")
    lr: float = Field(2e-3, gt=0, description="Adam learning rate [C]")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="constant [C] or cosine (decays to 0; steadier last weights)")
    threshold: float = Field(0.5, description="decision threshold [C]")
    hflip: bool = Field(True, description="random horizontal flips [C]")
    seed: int = Field(0, description="weights, crops and batch order")
    average_last: float = Field(0.0, ge=0, lt=1, description="share of the last steps whose weights are "
                                "averaged (SWA; BN statistics recomputed on the training set); 0: the last weights")
    ensemble: int = Field(1, ge=1, le=64, description="networks per row, trained with init seeds "
                          "seed·K … seed·K + K − 1, their probabilities averaged (a deep ensemble; "
                          "less init-seed noise) [ours; C: 1]")
    mixed_precision: Literal["no", "bf16", "auto"] = Field(
        "no", description="no, bf16 autocast of the training steps (~1.6x faster on a CPU with avx512_bf16, "
                          "~15x slower on one without), or auto: bf16 where the hardware has it, else fp32")

    _mixed_precision_no = field_validator("mixed_precision", mode="before")(_yaml_no)
