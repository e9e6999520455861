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
# toward foreground (docs/method.md §2.5):
#
# $$\hat\varepsilon=\varepsilon_\theta(z_t,y_b)+s\,\big(\varepsilon_\theta(z_t,y_f)-\varepsilon_\theta(z_t,y_b)\big).$$
#
# $s = 1$ is plain $y_f$ sampling (the default: the paper's FID is its $s = 1$ value), $s = 0$ plain
# $y_b$, negative $s$ pushes away from the object (pure backgrounds), large $s$ gives stronger objects
# on poorer backgrounds. DDIM, 50 steps, η = 0; every image has its own seed, so a resumed run gives
# the same images.
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
from fgbg_utils.views import explorers
from fgbg_utils.views import walkthrough as wt
cfg = notebook_config(globals(), stage="05", missing="warn")  # the walkthrough needs no run

# %% [markdown]
# ## Walkthrough: one seed across the guidance scale, in memory
#
# Concept guidance mixes the two predictions at every DDIM step (`core.synthesis.guided_eps`):
#
# $$\hat\varepsilon = \varepsilon(y_b) + s\,\big(\varepsilon(y_f) - \varepsilon(y_b)\big).$$
#
# `guidance_sweep` starts every scale from the **same** initial noise. It uses $m'$ of this run folder
# when notebook 03 has made it, else the pretrained $m$ (it says which).

# %%
from fgbg_utils.core.synthesis import guidance_sweep
from fgbg_utils.runs.notebook import relative
tuned_dir = wt.finetuned_folder(cfg)
pipe = wt.load_pipeline(cfg, tuned_dir)
sampler = pipe.tuned if pipe.tuned is not None else pipe.ldm
print("model:", f"m' from {relative(tuned_dir)}" if tuned_dir else "m (pretrained; no m' in this run folder yet)")
scales = cfg.synthesis.sweep_scales
images = guidance_sweep(sampler, cfg.resolved_prompt, cfg.background_prompt, scales, seed=cfg.seed,
                        steps=cfg.synthesis.steps)
fig = wt.strip_figure(images, [f"s = {s:g}" for s in scales], f"y_f = {cfg.resolved_prompt!r}, "
                      f"y_b = {cfg.background_prompt!r}")

# %% [markdown]
# ## Run stage 05 over the dataset
# %%
# NBVAL_SKIP
from fgbg_utils.stages import synthesis as stage_synthesis
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
