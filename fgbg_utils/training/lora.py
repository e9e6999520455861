"""LoRA mode of the fine-tuning (a cheaper deviation [I], docs/method.md §6 "Fine-tuning"): the
adapter config, its seeded insertion, and loading adapter weights with a strict key check."""
from __future__ import annotations

import torch

from fgbg_utils.core.seeds import derive_seed

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
LORA_WEIGHTS = "adapter_model.safetensors"


def lora_config(rank: int):
    from peft import LoraConfig
    return LoraConfig(r=int(rank), lora_alpha=int(rank), init_lora_weights="gaussian",
                      target_modules=list(LORA_TARGETS))


def add_lora(unet, config, seed: int) -> None:
    """Add the adapter with a seeded init without touching the caller's global RNG."""
    dev = next(unet.parameters()).device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(derive_seed(seed, "finetune-lora-init"))
        unet.add_adapter(config)


def load_lora_into(unet, state_dict, where, set_peft_model_state_dict=None):
    """Load adapter weights into ``unet``; any missing or unexpected LoRA key is an error."""
    if set_peft_model_state_dict is None:
        from peft.utils import set_peft_model_state_dict
    res = set_peft_model_state_dict(unet, state_dict)
    missing = [k for k in getattr(res, "missing_keys", []) if "lora_" in k]
    unexpected = list(getattr(res, "unexpected_keys", []))
    if missing or unexpected:
        raise ValueError(f"LoRA weights in {where} do not match the adapter "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")

