# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Concept distillation: teach the model to paint *background*
#
# The pretrained model $m$ knows the object; to remove it from an image we need a model that paints
# **plausible background**. Fine-tuning $m \to m'$ mixes two jobs (docs/method.md §2.3):
#
# * with probability $p = 0.5$ a **full image** with $y_f$ = *"a photo of a {object}"* (mask = 1);
# * otherwise a **background rectangle** with $y_b$ = *"a photo of a background"*: a random box of
#   background pixels, chosen with $M_{pre}$ (two background pixels as corners; sides > 10, area
#   between 16² and 32² on a 64-grid, not both sides > 32, ≥ 2/3 background; 100 tries, else the whole
#   background); the supervised region $\Omega$ is box ∧ background, so the object is never supervised with $y_b$.
#
# The loss is masked ε-prediction on the standard 4-channel UNet (no inpainting channels):
#
# $$z_t=\sqrt{\bar\alpha_t}z_0+\sqrt{1-\bar\alpha_t}\,\varepsilon,\qquad
# \mathcal L_{ft}=\frac{1}{|z|}\sum\big(\Omega\odot(\varepsilon-\varepsilon_\theta(z_t,t,\tau_\theta(y)))\big)^2 ,$$
#
# with $\Omega$ the supervised region (1 on a full image, box ∧ $\neg M_{pre}$ on a rectangle).
#
# `loss_norm: latent` divides by the latent size (official); `mask` by the mask size [ours]. The
# training loop is one `accelerate` loop (the same code under `accelerate launch` on several GPUs), with
# an EMA of the weights (exponential moving average, notebook 00b), optional LoRA (peft), resumable checkpoints and a bounded `max_train_steps`.

# %% tags=["parameters"]
# Parameters: papermill injects values after this cell. Any top-level key of the params file can
# be passed too, with -p KEY VALUE or -f FILE.yaml (e.g. -p T0 30, -p dataset '{n_train: 8}');
# they are merged over params_file, like the CLI's --set.
params_file = "params/toy.yaml"  # the YAML that drives this notebook (relative: project root)
run_dir = "runs/toy"             # run folder (relative: project root; the CLI passes its --out)
force = False                    # recompute this stage's finished outputs
interactive = True               # widgets when a browser is attached

# %%
# %matplotlib inline
from fgbg_utils.runs.notebook import notebook_config
import numpy as np
from fgbg_utils.views import gallery, plots
from fgbg_utils.views import walkthrough as wt
cfg = notebook_config(globals(), stage="03", missing="warn")  # the walkthrough needs no run

# %% [markdown]
# ## Walkthrough: one image, in memory
#
# The fixed toy image, its $M_{pre}$ (notebooks 01–02 in memory) and the pretrained model $m$.

# %%
from fgbg_utils.core.pipeline import to_uint8
image, gt, caption = wt.toy_example()
pipe = wt.load_pipeline(cfg)
ldm = pipe.ldm
maps = pipe.attention_maps(image, cfg.object, cfg.prompt, parts=cfg.parts, T0=cfg.T0, seed=cfg.seed,
                           ids=["walkthrough"])
m_pre = pipe.preliminary_masks(maps).masks[0]
x, frames = pipe.canvases(image)

# %% [markdown]
# **The rectangle sampler** draws two background pixels of $\neg M_{pre}$ as corners and accepts the
# first box that passes the rules (scaled from the 64-grid to this $h\times h$ latent grid); the supervised
# region is $\Omega$ = box ∧ $\neg M_{pre}$. Six draws on this image:

# %%
# NBVAL_CHECK_OUTPUT
from fgbg_utils.core.rectangles import RectRules, sample_rectangle
rules = RectRules.for_grid(ldm.latent_size)
rng = np.random.default_rng(cfg.seed)
draws = [sample_rectangle(~m_pre & maps.valid(0), rng, rules) for _ in range(6)]
print("boxes (top, left, bottom, right):", [box for _, _, box in draws])
fig = wt.rectangles_figure(to_uint8(x[0]), m_pre, draws, ldm.vae_factor)

# %% [markdown]
# **One masked-loss step** (no update): noise the whole latent, predict with the background prompt
# $y_b$, supervise only the region $\Omega$ (`finetune.loss_norm: latent` divides by $|z| = C\,h\,h$):
#
# $$\mathcal L_{ft} = \frac{1}{|z|}\sum \big(\Omega\odot(\varepsilon - \varepsilon_\theta(z_t, t, \tau_\theta(y_b)))\big)^2 .$$

# %%
# NBVAL_CHECK_OUTPUT
import torch
from fgbg_utils.core import models
from fgbg_utils.training.objective import batch_loss, step_noise
z0 = models.encode_images(ldm, x, "mode")                        # z_0 = κ·E(x)
t, eps = step_noise(cfg.seed, 0, 0, 1, tuple(z0.shape[1:]), ldm.scheduler.config.num_train_timesteps)
m = torch.from_numpy(draws[0][0])[None, None].float()
with torch.no_grad():  # as the trainer (SD3 / Flux: the flow-matching loss at the training grid's σ[t])
    loss = batch_loss(ldm, z0.float(), eps.to(z0.device), t.to(z0.device), cfg.background_prompt,
                      m.to(z0.device), cfg.finetune.loss_norm)
print(f"t = {t.item()}, supervised latent pixels = {int(m.sum())}, masked loss = {loss.item():.3g}")

# %% [markdown]
# ## What is trained over the dataset: rectangles sampled over $M_{pre}$

# %%
# NBVAL_SKIP
from fgbg_utils.stages import finetuning as stage_finetune
from fgbg_utils.views.finetune_views import rectangle_examples
fig = rectangle_examples(cfg, n=6)

# %% [markdown]
# ## Fine-tune

# %%
# NBVAL_SKIP
with gallery.reuse_note(cfg, "03"):
    result = stage_finetune.run(cfg, force=force)
tr = result["training"]
print(f"{tr['mode']} fine-tuning, {tr['steps_done']} steps, loss_norm={tr['loss_norm']}; "
      f"samples {tr['kinds']}, empty-mask share {tr['empty_fraction']:.1%}")

# %%
# NBVAL_SKIP
curve = result["training"]["loss_curve"]
k = max(1, len(curve) // 50)  # running mean over k steps
smooth = np.convolve(curve, np.ones(k) / k, mode="valid")
fig = plots.curve(np.arange(k, len(curve) + 1), smooth, "step", "masked loss",
                  f"fine-tuning loss (running mean of {k} steps)", logy=True)

# %% [markdown]
# ## Before / after: samples with $y_f$ and $y_b$ (same seeds)
#
# After fine-tuning, $y_b$ should give object-free scenes. The numbers below are label-free. The
# *presence score* of an image is the peak of the pretrained model's raw attention to the object word
# (stage 01's M̂ before normalisation). `share_object_free_*`: samples scoring below the 5th
# percentile of the real training images (which all contain the object). `auc_real_vs_*`: the
# probability that a real image scores higher than a sample — near 1 when the samples hold no object,
# near 0.5 when they look like the real images.
#
# Rows: $y_f$ plainly ($s = 1$), $y_b$ plainly ($s = 0$), and $y_b$ contrasted against $y_f$, the paper's
# way to sample object-free backgrounds: a diffusers call with prompt $y_b$, negative prompt $y_f$ and
# `finetune.eval_guidance` $w$, which in the one guidance convention of notebook 00b,
# $\hat\varepsilon = \varepsilon(y_b) + s\,(\varepsilon(y_f) - \varepsilon(y_b))$, is $s = 1 - w$ ($w = 3$: $s = -2$).
# The sentences under the table are computed from its numbers: whether each claim held on this run.
#
# The presence score is strict and noisy (it flags some clean samples). Notebook 06 checks the same
# samples with an independent detector, the U-Net trained on ground truth (`object_free_check`).

# %%
# NBVAL_SKIP
from fgbg_utils.views.finetune_views import sample_grid
from IPython.display import Markdown, display
from fgbg_utils.views.finetune_views import object_free_report
fig = sample_grid(cfg)
oa = result.get("object_absent", {})
display(Markdown(object_free_report(oa, contrast_guidance=oa.get("contrast_guidance"))))
print("AUC real vs samples:", {k.removeprefix("auc_real_vs_"): round(v, 3) for k, v in oa.items() if k.startswith("auc")})
