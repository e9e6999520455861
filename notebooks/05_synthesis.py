# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Synthesis: new image/mask pairs from the fine-tuned model
#
# The fine-tuned $m'$ knows essentially two prompts, $y_f$ and $y_b$, so guidance runs from background
# toward foreground, in the one guidance convention of this project (notebook 00b, docs/method.md §2.5):
#
# $$\hat\varepsilon=\varepsilon_\theta(z_t,t,\tau_\theta(y_b))+s\,\big(\varepsilon_\theta(z_t,t,\tau_\theta(y_f))-\varepsilon_\theta(z_t,t,\tau_\theta(y_b))\big).$$
#
# $s = 1$ is plain $y_f$ sampling (the parameter's default and the paper's FID setting), $s = 0$ plain
# $y_b$, negative $s$ pushes away from the object (pure backgrounds), large $s$ gives stronger objects
# on poorer backgrounds. `synthesis.guidance` is $s$ itself; the toy run sets $s = 2$ (objects are often
# faint at $s = 1$ here; chosen on the validation world). DDIM, 50 steps, η = 0; every image has its
# own seed, so a resumed run gives the same images.
#
# The method's steps then run on $D'$ in memory, through the same `FgBgPipeline` — the attention
# maps of stage 01 with the **pretrained** $m$, the GMM of stage 02, and the refinement of stage 04
# with $m'$ — giving $D'_m$ (stage 05 needs $m'$, not stage 04's outputs). $D'_s$ is written in the
# same folder layout as a real dataset (`dataset/images/`, `dataset/masks/`, `split.csv`), with the
# foreground cut-outs $D'_f = x' \odot D'_m$ (RGBA) and the object-free backgrounds $D'_b$ (the
# inpaintings of the refinement).

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
from fgbg_utils.views import evaluation_views as views
from fgbg_utils.views import explorers, gallery
from fgbg_utils.views import walkthrough as wt
cfg = notebook_config(globals(), stage="05", missing="warn")  # the walkthrough needs no run

# %% [markdown]
# ## Walkthrough: one guided sample, in memory
#
# It uses $m'$ of this run folder when notebook 03 has made it, else the pretrained $m$ (it says
# which), and the run's own `synthesis.guidance` $s$ and `synthesis.steps`. First the guided DDIM loop
# written out (the DDIM update of notebook 00b, here `DDIMScheduler.step`), checked against the
# stage's sampler `core.synthesis.sample_guided`:

# %%
import torch
from diffusers import DDIMScheduler
from fgbg_utils.core import models
from fgbg_utils.core.synthesis import guidance_sweep, initial_latents, sample_guided
tuned_dir = wt.finetuned_folder(cfg)
pipe = wt.load_pipeline(cfg, tuned_dir)
sampler = pipe.tuned if pipe.tuned is not None else pipe.ldm
print("model:", "m' of this run folder (RUN/03_finetuning)" if tuned_dir else "m (pretrained; no m' in this run folder yet)")
s, steps = cfg.synthesis.guidance, cfg.synthesis.steps
print(f"synthesis.guidance: s = {s:g}, {steps} DDIM steps, η = 0")
with torch.no_grad():
    sched = DDIMScheduler.from_config(sampler.scheduler.config)
    sched.set_timesteps(steps)
    c = torch.cat([models.encode_prompt(sampler, cfg.background_prompt), models.encode_prompt(sampler, cfg.resolved_prompt)])
    z = initial_latents(sampler, [cfg.seed]) * sched.init_noise_sigma          # z_T, from the image's seed
    for t in sched.timesteps:
        e_b, e_f = sampler.unet(torch.cat([z, z]), t, encoder_hidden_states=c).sample.chunk(2)
        z = sched.step(e_b + s * (e_f - e_b), t, z, eta=0.0).prev_sample      # ε̂ = ε(y_b) + s(ε(y_f) − ε(y_b))
images, latents = sample_guided(sampler, cfg.resolved_prompt, cfg.background_prompt, s, [cfg.seed], steps)
assert torch.allclose(z, latents, atol=1e-4), float((z - latents).abs().max())
print(f"the loop gives the stage's sample: max |Δz_0| = {float((z - latents).abs().max()):.1e}")

# %% [markdown]
# **The same seed across the guidance scale.** `guidance_sweep` starts every scale from the **same**
# initial noise $z_T$; the run's $s$ is marked.

# %%
scales = cfg.synthesis.sweep_scales
sweep = guidance_sweep(sampler, cfg.resolved_prompt, cfg.background_prompt, scales, seed=cfg.seed, steps=steps)
fig = wt.strip_figure([wt.decode(sampler, z), *sweep], [f"the loop, s = {s:g}", *[f"s = {v:g}" + (" (run)" if v == s else "") for v in scales]],
                      f"y_f = {cfg.resolved_prompt!r}, y_b = {cfg.background_prompt!r}")

# %% [markdown]
# ## Run stage 05 over the dataset
# %%
# NBVAL_SKIP
from fgbg_utils.stages import synthesis as stage_synthesis
with gallery.reuse_note(cfg, "05"):
    result = stage_synthesis.run(cfg, force=force)
print(f"{result['n_images']} synthetic images (s = {result['guidance']:g}), "
      f"{result['n_pure_backgrounds']} pure backgrounds (s = {result['background_guidance']:g})")

# %% [markdown]
# ## Guidance sweep (the paper's Fig. 8)
#
# The same initial noise at every scale $s$: left of $s = 0$ the object fades out of the scene, right
# of $s = 1$ it becomes more pronounced.

# %%
# NBVAL_SKIP
fig = views.guidance_sweep(cfg)

# %% [markdown]
# ## FID of $D'$ against $s$ (the paper's Table 3 and Fig. 8)
#
# The Fréchet distance between Gaussians fitted to the features of real and synthetic images,
# $\mathrm{FID} = \lVert\mu_r-\mu_g\rVert^2 + \mathrm{Tr}\big(\Sigma_r+\Sigma_g-2(\Sigma_r\Sigma_g)^{1/2}\big)$
# (torchmetrics). On the toy world the features come from a small network of the project's own, trained on
# the toy generator's labels (`models/toy-features`); on real data from Inception-v3
# (`synthesis.fid_features`). The floor is the FID between two halves of the real images: the noise
# level of this sample size. Toy and paper FIDs live in different feature spaces: compare the shape of
# the curve, not its level.

# %%
# NBVAL_SKIP
from fgbg_utils.views import evidence
print(evidence.fid_table(cfg.run_dir))
fig = evidence.fid_curve(cfg.run_dir)

# %% [markdown]
# ## The U-Net's IoU against $s$ (Fig. 8)
#
# Which $s$ makes the best training data? `python -m fgbg_utils guidance-sweep params/toy.yaml --out
# runs/guidance-sweep` runs stages 01–04
# once and stages 05–06 for each $s$, training U-Net$(D_s \cup D'_s)$ with several init seeds. Left:
# FID of each $D'$; right: the U-Net's IoU on the real test images (mean ± sd over seeds).

# %%
# NBVAL_SKIP
from fgbg_utils.runs.params import resolve_path
fig = evidence.sweep_curve(resolve_path("runs/guidance-sweep"))  # the sweep's --out

# %% [markdown]
# ## Browse $D'$ with its masks $D'_m$, cut-outs $D'_f$ and backgrounds $D'_b$

# %%
# NBVAL_SKIP
fig = explorers.synthetic_explorer(cfg, interactive, n=6)

# %% [markdown]
# ## Pure backgrounds
#
# Sampled with $y_b$ and negative $s$ (`synthesis.background_guidance`): object-free scenes, although
# the model never saw a whole object-free image during fine-tuning. Notebook 06 counts how many hold
# an object, with the supervised U-Net as an independent detector.

# %%
# NBVAL_SKIP
fig = views.pure_backgrounds(cfg, n=8)

# %% [markdown]
# ## $D'_s$ reads back like a real dataset

# %%
# NBVAL_SKIP
images, masks = stage_synthesis.load_pairs(cfg)
print(len(images), "pairs; image", images[0].shape, "mask", masks[0].shape, masks[0].dtype)
