"""The fine-tuning objective (docs/method.md §2.3): per-step noise and timesteps, the prediction
target (ε or v), and the masked loss of one batch."""
from __future__ import annotations

import torch

from fgbg_utils.core import rectangles
from fgbg_utils.core.seeds import derive_seed


def step_noise(seed: int, step: int, micro: int, n: int, shape: tuple, num_train_timesteps: int):
    """(t (n,) long, ε (n, *shape)) for one micro-batch of the global batch; CPU, seeded by
    (seed, step, micro) only."""
    gen = torch.Generator().manual_seed(derive_seed(int(seed), "finetune-noise", f"{int(step)}:{int(micro)}"))
    t = torch.randint(0, int(num_train_timesteps), (n,), generator=gen, dtype=torch.long)
    noise = torch.randn((n, *shape), generator=gen)
    return t, noise


def prediction_target(noise_scheduler, z0, noise, t):
    """What the UNet predicts: ε (epsilon) or v (v_prediction), from the scheduler config."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(z0, noise, t)
    raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")


def masked_step_loss(unet, noise_scheduler, z0, noise, t, emb, mask, loss_norm: str = "latent",
                     added: dict | None = None):
    """Forward + masked ε-loss of one batch (docs/method.md §2.3): the whole latent is noised, only the
    mask is supervised. `added`: SDXL's added conditions per row (text_embeds, time_ids)."""
    zt = noise_scheduler.add_noise(z0, noise, t)
    kw = {} if added is None else {"added_cond_kwargs": added}
    pred = unet(zt, t, encoder_hidden_states=emb, **kw).sample
    target = prediction_target(noise_scheduler, z0, noise, t)
    return rectangles.masked_eps_loss(pred.float(), target.float(), mask, loss_norm)



def batch_loss(ldm, z0, noise, t, prompt: str, mask, loss_norm: str = "latent"):
    """The trainer's masked loss of one batch with `ldm`'s own model and one prompt, for any family:
    ε/v (SD 1.x/2.x; SDXL with its added conditions) on the DDPM forward process at timesteps t, or
    the flow-matching velocity loss (SD3, Flux) at σ = the training grid's σ[t]."""
    from diffusers import DDPMScheduler

    from fgbg_utils.core import families
    cond = families.encode_condition(ldm, prompt)
    n = len(z0)
    if ldm.family in families.FLOW:
        from fgbg_utils.core.flow import masked_flow_loss, training_sigmas
        return masked_flow_loss(ldm, ldm.unet, z0, noise, training_sigmas(ldm.scheduler)[t.cpu()].to(z0.device),
                                cond, mask, loss_norm)
    added = families.added_conditions(cond)
    if added is not None:
        added = families.unet_kwargs(added, n, z0.device, z0.dtype)["added_cond_kwargs"]
    return masked_step_loss(ldm.unet, DDPMScheduler.from_config(ldm.scheduler.config), z0, noise, t,
                            cond.emb, mask, loss_norm, added)
