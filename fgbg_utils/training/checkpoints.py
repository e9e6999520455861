"""Fine-tuning outputs (docs/method.md §2.3, §5.8): base-model fingerprints, resumable checkpoints,
the export of the EMA weights, and `load_finetuned` (m').

Output folder ``out_dir``::

    checkpoints/step_000200/   accelerate.save_state (model/LoRA, optimizer, EMA, RNG) +
                               fgbg_state.json; written to .tmp_step_* then renamed; last 2 kept
    unet/                      full mode: EMA UNet (save_pretrained, safetensors)
    lora/                      LoRA mode: adapter_model.safetensors + adapter_config.json
    fgbg_finetune.json         written last: its presence marks a finished export
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fgbg_utils.core.models import LDM
from fgbg_utils.io import atomic_write_json, read_json
from fgbg_utils.training.config import RESUME_FREE, FinetuneConfig
from fgbg_utils.training.lora import LORA_WEIGHTS, add_lora, load_lora_into

if TYPE_CHECKING:
    from fgbg_utils.training.trainer import Finetuner

META_NAME = "fgbg_finetune.json"
STATE_NAME = "fgbg_state.json"
KEEP_CHECKPOINTS = 2


def unet_config_hash(unet) -> str:
    """sha256 of the UNet config as sorted JSON, keys starting with "_" excluded."""
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def weights_fingerprint(unet) -> str:
    """Cheap identity check of the base weights (conv_in / conv_out, rounded to fp16)."""
    h = hashlib.sha256()
    for name in ("conv_in", "conv_out"):
        mod = getattr(unet, name, None)
        if mod is not None:
            h.update(mod.weight.detach().to("cpu", torch.float16).numpy().tobytes())
    return h.hexdigest()



_CKPT = re.compile(r"^step_(\d{6,})$")


def list_checkpoints(out_dir) -> list[tuple[int, Path]]:
    """Finished checkpoints (step, folder), oldest first."""
    ck = Path(out_dir) / "checkpoints"
    if not ck.is_dir():
        return []
    found = []
    for p in ck.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and (p / STATE_NAME).exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def counts_summary(kinds: dict) -> tuple[int, float]:
    """(number of samples, share of empty-mask samples)."""
    n = sum(kinds.values())
    return n, (kinds.get("empty", 0) / n if n else 0.0)


def check_resumable(state: dict, cfg: FinetuneConfig, base_hash: str, where: Path) -> None:
    """Refuse to resume from a checkpoint of another base model, other settings or a later step."""
    if state.get("base_unet_config_hash") != base_hash:
        raise ValueError(f"checkpoint {where} was trained from base {state.get('base_model')!r} "
                         "with a different UNet config; resume with that base model or use a new "
                         "out_dir.")
    old, new = state.get("config", {}), cfg.to_dict()
    diff = {k: (old.get(k), v) for k, v in new.items() if k not in RESUME_FREE and old.get(k) != v}
    if diff:
        raise ValueError(f"cannot resume from {where}: settings differ from the checkpoint "
                         f"({', '.join(f'finetune.{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}). "
                         "Restore them, or train into a new out_dir (or pass resume=False on an "
                         "empty one).")
    if state["step"] > cfg.max_train_steps:
        raise ValueError(f"checkpoint {where} is at step {state['step']}, beyond "
                         f"finetune.max_train_steps={cfg.max_train_steps}; raise max_train_steps "
                         "or use a new out_dir.")


def save_checkpoint(run: "Finetuner", out: Path, step: int, state: dict) -> Path:
    """accelerate.save_state into .tmp_step_* then rename; keep the last KEEP_CHECKPOINTS."""
    acc = run.acc
    ck = out / "checkpoints"
    final, tmp = ck / f"step_{step:06d}", ck / f".tmp_step_{step:06d}"
    if acc.is_main_process:
        ck.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    if not final.exists():
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            atomic_write_json(tmp / STATE_NAME, state)
            os.replace(tmp, final)
            for _, old in list_checkpoints(out)[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def export(run: "Finetuner", out: Path) -> None:
    """Main process: EMA weights into the trained copy, then unet/ (full) or lora/ (LoRA)."""
    unet = run.unwrapped()
    if run.ema is not None:
        run.ema.copy_to(run.params)
    if run.cfg.mode == "full":
        tmp = out / ".tmp_unet"
        shutil.rmtree(tmp, ignore_errors=True)
        unet.save_pretrained(tmp, safe_serialization=True)
        _replace_dir(tmp, out / "unet")
    else:
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file
        tmp = out / ".tmp_lora"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        sd = get_peft_model_state_dict(unet)
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp / LORA_WEIGHTS))
        unet.peft_config["default"].save_pretrained(str(tmp))
        _replace_dir(tmp, out / "lora")


def check_out_dir_mode(out: Path, mode: str) -> None:
    """LoRA and full fine-tuning outputs are never mixed in one folder."""
    other = out / ("lora" if mode == "full" else "unet")
    if other.exists():
        raise ValueError(f"{out} already holds {other.name}/ from a "
                         f"{'LoRA' if mode == 'full' else 'full'} fine-tuning run; LoRA and full "
                         "fine-tuning outputs are never mixed. Use a new out_dir.")



def load_finetuned(ldm: LDM, out_dir) -> LDM:
    """m': ``ldm`` with the fine-tuned UNet from ``out_dir`` (eval, no grad); other parts shared."""
    out = Path(out_dir)
    meta_path = out / META_NAME
    if not meta_path.exists():
        raise ValueError(f"{out} has no {META_NAME}: not a finished fine-tuning folder (train() "
                         "writes it last, after the export).")
    meta = read_json(meta_path)
    has_full, has_lora = (out / "unet").is_dir(), (out / "lora").is_dir()
    present = "full" if has_full and not has_lora else "lora" if has_lora and not has_full else None
    if present is None or meta.get("mode") != present:
        found = [n for n, ok in (("unet/", has_full), ("lora/", has_lora)) if ok] or ["neither"]
        raise ValueError(f"{out} holds {' and '.join(found)} but {META_NAME} says mode="
                         f"{meta.get('mode')!r}; LoRA and full fine-tuning outputs are never mixed. "
                         "Re-export into a clean folder.")
    h = unet_config_hash(ldm.unet)
    if h != meta.get("base_unet_config_hash"):
        raise ValueError(f"checkpoint folder {out} was fine-tuned from base "
                         f"{meta.get('base_model')!r}; model.path is {ldm.path!r}, whose UNet config "
                         f"differs (hash {h[:12]} vs {str(meta.get('base_unet_config_hash'))[:12]}). "
                         "Load the base model it was trained from, or fine-tune this one.")
    fp = meta.get("base_unet_weights_fingerprint")
    if fp and fp != weights_fingerprint(ldm.unet):
        warnings.warn(f"{out} was fine-tuned from {meta.get('base_model')!r}; the UNet weights of "
                      f"{ldm.path!r} differ (same architecture). "
                      + ("The LoRA is applied to different base weights." if present == "lora"
                         else "The full fine-tuned UNet does not depend on them."))
    dev, dtype = ldm.unet.device, ldm.unet.dtype
    if present == "full":
        unet = type(ldm.unet).from_pretrained(str(out / "unet"))  # UNet, or SD3's transformer
    else:
        from peft import LoraConfig
        from safetensors.torch import load_file
        unet = copy.deepcopy(ldm.unet)
        add_lora(unet, LoraConfig.from_pretrained(str(out / "lora")), 0)
        load_lora_into(unet, load_file(str(out / "lora" / LORA_WEIGHTS)), out / "lora")
    unet.to(dev)
    if unet.dtype != dtype:
        unet.to(dtype)
    unet.eval().requires_grad_(False)
    tuned = dataclasses.replace(ldm, unet=unet)  # same family, text encoders and scheduler
    tuned.finetune_dir = str(out)  # provenance: path stays the base model's (tokenizer etc.)
    return tuned
