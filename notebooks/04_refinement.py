# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Refinement: paint the object away and keep what changed
#
# With the fine-tuned $m'$, the region of $M_{pre}$ is repainted as background (Eq. 6, latent
# blending: the known region $\neg M_{pre}$ is re-noised from $z_0$ at every step),
#
# $$\tilde z_0 = z_0\odot(1-M_{pre}) + z\odot M_{pre},\qquad \hat x = m'(\tilde z_0, y_b),$$
#
# and the refined mask keeps only what changed (Eq. 5):
#
# $$M = M_{pre,\uparrow}\ \wedge\ g\big(|x - \hat x|\big),$$
#
# with $g$ the same GMM + orphan filter as notebook 02, on the mean RGB difference. $x$ is the VAE
# round trip of the image, so reconstruction error does not leak into the difference. $M$ can only
# shrink $M_{pre}$. **Baseline $M_{crop}$**: instead of $m'$, mirror the largest background strip next
# to $M_{pre}$'s box over the object (the paper's "simple inpainting").
#
# Inpainting uses diffusers' `StableDiffusionInpaintPipeline` with the 4-channel fine-tuned UNet
# (DDIM, 50 steps, η = 0); it blends after each step rather than before each UNet call, a small
# documented deviation from the official loop.

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
from fgbg_utils.views import gallery, plots
cfg = notebook_config(globals(), stage="04")
from fgbg_utils.stages import refinement as stage_refinement

# %%
# NBVAL_IGNORE_OUTPUT
result = stage_refinement.run(cfg, force=force)

# %% [markdown]
# ## Metrics on the evaluation split
#
# Paper, CUB (Table 2, IoU): $M_{pre}$ 29.0 → $M$ 63.6; $M_{crop}$ 30.7.

# %%
# NBVAL_CHECK_OUTPUT
from fgbg_utils.runs.runner import metrics_table
print(metrics_table(cfg["run_dir"], stages=("02", "04")))

# %% [markdown]
# ## Best and worst images: original, $M_{pre}$, inpainted background, difference, $M$

# %%
from fgbg_utils.views.finetune_views import refinement_rows
rows = refinement_rows(cfg, best=3, worst=3)
if not rows:
    gallery.no_ground_truth("images are ranked by the IoU of M")
else:
    fig = plots.image_rows(rows, ["image", "ground truth", "M_pre", "background", "difference", "M", "M_crop"])
