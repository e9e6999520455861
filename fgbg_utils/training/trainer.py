"""The fine-tuning loop on `accelerate` (docs/method.md §2.3): `Finetuner` (the state of one run,
one optimizer step at a time) and `train` (resume, checkpoints, export). See
`fgbg_utils.training.finetune` for the design notes."""
from __future__ import annotations

import copy
import os
import shutil
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fgbg_utils.core import families
from fgbg_utils.core.models import LDM, encode_images
from fgbg_utils.io import atomic_write_json, read_json
from fgbg_utils.training.batches import MaskedImageDataset
from fgbg_utils.training.checkpoints import (META_NAME, STATE_NAME, check_out_dir_mode,
                                             check_resumable, counts_summary, export,
                                             list_checkpoints, save_checkpoint, unet_config_hash,
                                             weights_fingerprint)
from fgbg_utils.training.config import KINDS, FinetuneConfig
from fgbg_utils.training.lora import LORA_WEIGHTS, add_lora, load_lora_into, lora_config
from fgbg_utils.training.objective import masked_step_loss, step_noise


class Finetuner:
    """State of one fine-tuning run on an `accelerate.Accelerator` (used by `train`; exposed for
    benchmarks). `train_step(s)` performs optimizer step s (1-based)."""

    def __init__(self, ldm: LDM, data, cfg: FinetuneConfig, accelerator):
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        self.cfg, self.acc = cfg, accelerator
        dev = accelerator.device
        self.dataset = data if isinstance(data, MaskedImageDataset) else \
            MaskedImageDataset.from_config(data, cfg)
        self.dataset.num_processes = accelerator.num_processes
        if (self.dataset.latent_size, self.dataset.resolution) != (ldm.latent_size, ldm.resolution):
            raise ValueError(f"the data are {self.dataset.resolution}px canvases with "
                             f"{self.dataset.latent_size}² masks but {ldm.path!r} works at "
                             f"{ldm.resolution}px / {ldm.latent_size}² latents")
        self.base_config_hash = unet_config_hash(ldm.unet)
        self.base_fingerprint = weights_fingerprint(ldm.unet)

        # frozen parts: used once, here
        for m in (ldm.vae, ldm.text_encoder):
            m.requires_grad_(False).eval().to(dev)
        conds = {p: families.encode_condition(ldm, p) for p in dict.fromkeys(self.dataset.prompts.values())}
        self.emb = {p: c.emb.to(dev, torch.float32) for p, c in conds.items()}
        self.added = {p: families.added_conditions(c, dev, torch.float32) for p, c in conds.items()}
        self.pooled = {p: (None if c.pooled is None else c.pooled.to(dev, torch.float32)) for p, c in conds.items()}
        self.flow_model = ldm if ldm.family in families.FLOW else None  # SD3/Flux: masked flow-matching loss
        self.text_ids = next(iter(conds.values())).text_ids if conds else None  # Flux's RoPE text ids
        self.dataset.set_latents(self._encode_all(ldm))

        unet = copy.deepcopy(ldm.unet).to(dev)
        if unet.dtype != torch.float32:  # trainable weights stay fp32 (autocast does the rest)
            unet.to(torch.float32)
        unet.requires_grad_(False)
        if cfg.mode == "lora":
            add_lora(unet, lora_config(cfg.lora_rank), cfg.seed)
            for n, p in unet.named_parameters():
                p.requires_grad_("lora_" in n)
        else:
            unet.requires_grad_(True)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        self.param_names = [n for n, p in unet.named_parameters() if p.requires_grad]
        self.params = [p for p in unet.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters (LoRA found no target modules?)")
        optimizer = make_optimizer(self.params, cfg)
        if cfg.mode == "lora":
            accelerator.register_save_state_pre_hook(self._save_hook)
            accelerator.register_load_state_pre_hook(self._load_hook)
        self.unet, self.optimizer = accelerator.prepare(unet, optimizer)
        self.ema = None
        if cfg.use_ema:
            self.ema = EMAModel(self.params, decay=cfg.ema_decay)
            self.ema.to(dev)
            accelerator.register_for_checkpointing(self.ema)
        if self.flow_model is not None:
            from diffusers import FlowMatchEulerDiscreteScheduler

            from fgbg_utils.core.flow import training_sigmas
            self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(ldm.scheduler.config)
            self.sigmas = training_sigmas(ldm.scheduler)
        else:
            self.noise_scheduler = DDPMScheduler.from_config(ldm.scheduler.config)
        self.latent_shape = tuple(self.dataset.latents.shape[2:])
        self.kinds: Counter = Counter({k: 0 for k in KINDS})
        self.loss_curve: list[float] = []

    @torch.no_grad()
    def _encode_all(self, ldm, chunk: int = 8) -> torch.Tensor:
        ds, out = self.dataset, []
        for lo in range(0, len(ds), chunk):
            idx = range(lo, min(lo + chunk, len(ds)))
            pair = [encode_images(ldm, torch.stack([ds.image(i, f) for i in idx])).float().cpu()
                    for f in (False, True)]
            out.append(torch.stack(pair, 1))
        return torch.cat(out)

    # accelerate hooks (LoRA): checkpoints hold only the adapter weights
    def _save_hook(self, models, weights, output_dir):
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file
        if self.acc.is_main_process:
            sd = get_peft_model_state_dict(self.acc.unwrap_model(models[0]))
            save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()},
                      os.path.join(output_dir, LORA_WEIGHTS))
        if weights:
            weights.pop(0)

    def _load_hook(self, models, input_dir):
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file
        model = self.acc.unwrap_model(models.pop(0))
        load_lora_into(model, load_file(os.path.join(input_dir, LORA_WEIGHTS)), input_dir,
                        set_peft_model_state_dict)

    def unwrapped(self):
        return self.acc.unwrap_model(self.unet)

    def train_step(self, step: int) -> float:
        cfg, acc, ds = self.cfg, self.acc, self.dataset
        dev, b, r = acc.device, cfg.batch_size, acc.process_index
        mine = slice(r * b, (r + 1) * b)
        total = 0.0
        for micro in range(cfg.gradient_accumulation_steps):
            batch = ds.batch_for_step(step, micro, with_images=False,
                                      accumulation_steps=cfg.gradient_accumulation_steps)
            self.kinds.update(batch["kinds"])
            t, noise = step_noise(cfg.seed, step, micro, ds.global_batch_size, self.latent_shape,
                                  self.noise_scheduler.config.num_train_timesteps)
            z0 = batch["latents"][mine].to(dev)
            mask = batch["masks"][mine].to(dev)
            emb = torch.cat([self.emb[p] for p in batch["prompts"][mine]])
            added = self._added(batch["prompts"][mine])
            with acc.accumulate(self.unet):
                if self.flow_model is not None:  # t indexes the training σ grid
                    from fgbg_utils.core.flow import masked_flow_loss
                    cond = families.Condition(emb, torch.cat([self.pooled[p] for p in batch["prompts"][mine]]),
                                              text_ids=self.text_ids)
                    loss = masked_flow_loss(self.flow_model, self.unet, z0, noise[mine].to(dev),
                                            self.sigmas[t[mine]].to(dev), cond, mask, cfg.loss_norm)
                else:
                    loss = masked_step_loss(self.unet, self.noise_scheduler, z0, noise[mine].to(dev),
                                            t[mine].to(dev), emb, mask, cfg.loss_norm, added)
                acc.backward(loss)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            total += acc.gather(loss.detach().float().reshape(1)).mean().item()
        if self.ema is not None and acc.sync_gradients:
            self.ema.step(self.params)
        value = total / cfg.gradient_accumulation_steps
        self.loss_curve.append(value)
        return value

    def _added(self, prompts) -> dict | None:
        """SDXL's added conditions of the batch rows (None for SD 1.x/2.x)."""
        rows = [self.added[p] for p in prompts]
        if not rows or rows[0] is None:
            return None
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def kind_counts(self) -> dict:
        return {k: int(self.kinds.get(k, 0)) for k in KINDS}



def make_accelerator(cfg: FinetuneConfig, out: Path):
    from accelerate import Accelerator
    try:
        return Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                           mixed_precision=cfg.mixed_precision, project_dir=str(out))
    except ValueError as e:
        if "already been initialized" in str(e):
            raise ValueError(f"finetune.mixed_precision={cfg.mixed_precision!r} differs from an "
                             "earlier run in this Python process; accelerate fixes it per process. "
                             "Restart the kernel to change it.") from e
        raise


def train(ldm: LDM, data: list, cfg: FinetuneConfig, out_dir, resume: bool = True,
          log: Callable[[str], None] | None = None, progress: bool = True,
          accelerator=None) -> dict:
    """Fine-tune ``ldm``'s UNet on ``data`` (list of (canvas, m_pre, valid)); returns the
    summary also written to ``out_dir/fgbg_finetune.json``. See the module docstring."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    out = Path(out_dir)
    acc = accelerator if accelerator is not None else make_accelerator(cfg, out)
    main = acc.is_main_process

    def say(msg: str) -> None:
        if main:
            (log or print)(msg)

    check_out_dir_mode(out, cfg.mode)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for p in (out / "checkpoints").glob(".tmp_step_*"):  # interrupted saves
            shutil.rmtree(p, ignore_errors=True)
    acc.wait_for_everyone()

    run = Finetuner(ldm, data, cfg, acc)
    seconds_before, start = 0.0, 1
    ckpts = list_checkpoints(out)
    if ckpts and not resume:
        raise ValueError(f"{out} already holds checkpoints (latest {ckpts[-1][1].name}); pass "
                         "resume=True to continue, or use a new out_dir.")
    if ckpts:
        step0, where = ckpts[-1]
        state = read_json(where / STATE_NAME)
        check_resumable(state, cfg, run.base_config_hash, where)
        if state.get("num_processes") != acc.num_processes:
            warnings.warn(f"resuming a run made with {state.get('num_processes')} process(es) on "
                          f"{acc.num_processes}: the global batch and sample stream change.")
        acc.load_state(str(where))
        if run.ema is not None:
            run.ema.to(acc.device)
        run.loss_curve = [float(x) for x in state["loss_curve"]]
        run.kinds = Counter({k: int(state["kinds"].get(k, 0)) for k in KINDS})
        seconds_before = float(state.get("seconds", 0.0))
        start = step0 + 1
        say(f"resumed from {where} (step {step0}/{cfg.max_train_steps})")

    def snapshot(step: int) -> dict:
        kinds = run.kind_counts()
        n, frac = counts_summary(kinds)
        return {
            "mode": cfg.mode, "base_model": ldm.path,
            "base_unet_config_hash": run.base_config_hash,
            "base_unet_weights_fingerprint": run.base_fingerprint,
            "max_train_steps": cfg.max_train_steps, "steps_done": step, "step": step,
            **cfg.to_dict(), "config": cfg.to_dict(),
            "num_processes": acc.num_processes,
            "global_batch_size": run.dataset.global_batch_size,
            "n_images": len(run.dataset),
            "kinds": kinds, "samples": n, "empty_fraction": frac,
            "loss_curve": list(run.loss_curve),
            "seconds": seconds_before + time.perf_counter() - t_start,
        }

    def report_empty(step: int) -> None:
        kinds = run.kind_counts()
        n, frac = counts_summary(kinds)
        say(f"step {step}: loss {np.mean(run.loss_curve[-cfg.checkpoint_every:]):.5f}; samples "
            f"{kinds} → empty-mask samples {kinds['empty']}/{n} ({frac:.1%}; zero loss, docs/method.md §5.9)")

    bar = tqdm(total=cfg.max_train_steps, initial=start - 1, desc=f"fine-tune ({cfg.mode})",
               disable=not (progress and main))
    step = start - 1
    try:
        for step in range(start, cfg.max_train_steps + 1):
            loss = run.train_step(step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if step % cfg.checkpoint_every == 0:
                save_checkpoint(run, out, step, snapshot(step))
                report_empty(step)
    finally:
        bar.close()
    save_checkpoint(run, out, step, snapshot(step))  # the final state (no-op if just saved)
    summary = snapshot(step)
    summary.pop("config"), summary.pop("step")
    n, frac = summary["samples"], summary["empty_fraction"]
    if n and frac > 0.5:
        warnings.warn(f"{frac:.0%} of the fine-tuning samples had an empty mask (zero loss): "
                      "M_pre leaves (almost) no background (docs/method.md §5.9).")
    acc.wait_for_everyone()
    if main:
        export(run, out)
        summary["seconds"] = seconds_before + time.perf_counter() - t_start
        atomic_write_json(out / META_NAME, summary)
    acc.wait_for_everyone()
    if step % cfg.checkpoint_every or step < start:  # not just reported at a checkpoint
        report_empty(step)
    say(f"fine-tuned UNet ({cfg.mode}, loss_norm={cfg.loss_norm}) written to {out}")
    return summary



def make_optimizer(params, cfg: FinetuneConfig):
    """AdamW with torch defaults (weight decay 0.01) [C]; bitsandbytes' 8-bit AdamW on request."""
    if not cfg.use_8bit_adam:
        return torch.optim.AdamW(params, lr=cfg.learning_rate)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError("finetune.use_8bit_adam is true but the bitsandbytes package is not "
                         "installed; `pip install bitsandbytes` (GPU) or set use_8bit_adam: false") from None
    return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate)
