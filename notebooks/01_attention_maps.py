# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Attention maps: where does the model look when it reads the object word?
#
# A text-to-image latent diffusion model (LDM) denoises a latent $z_t$ while reading a prompt such as
# *"a photo of a bird"*. Every cross-attention layer $l$ lets each latent pixel attend to the prompt's
# tokens:
#
# $$\psi_{t,l} = \operatorname{softmax}\!\Big(\frac{Q_l K_l^\top}{\sqrt{d_k}}\Big),\qquad
# Q_l = W_Q\,\varphi_l(z_t),\quad K_l = W_K\,\tau_\theta(y)$$
#
# ($\varphi_l(z_t)$: the UNet's features at layer $l$; $\tau_\theta$: the text encoder; $d_k$: the width of
# one attention head; notebook 00b defines every symbol).
#
# The column of $\psi$ that belongs to the object word says, for each pixel, how much the model
# "looks at" the word there. Dombrowski et al. (ICCV 2023) average it over the $T_0$ lowest noise
# levels and the set $\mathcal A$ of cross-attention layers (their Eq. 3–4). What the code computes:
#
# $$\hat M = \operatorname{minmax}\Big(\frac{1}{T_0\,|\mathcal A|}\sum_{t\in\mathcal T_{T_0}}\sum_{l\in\mathcal A}\sum_{j\in J}\bar\psi_{t,l}[\,\cdot\,, j]\Big),
# \qquad \mathcal T_{T_0} = \{1, 21, 41, \dots, 1 + 20\,(T_0-1)\},$$
#
# with $\mathcal T_{T_0}$ the $T_0$ lowest levels of the 50-step DDIM grid (1, 21, …, 781 for $T_0 = 40$),
# $\bar\psi$ the mean over heads, $J$ the object word's token(s), each layer's map repeated up to the
# $h\times h$ latent grid, and $\operatorname{minmax}(a) = (a - \min a)/(\max a - \min a)$ over the image's
# valid pixels.
#
# How this notebook computes it (docs/method.md §2.1):
# 1. Put the image in the **canonical frame** (long edge to the model's resolution $R$, pad with black)
#    and encode it: $z_0 = \kappa\,\mathcal E(x)$ ($\kappa$: the VAE's `scaling_factor`).
# 2. For each of the $T_0$ lowest steps of the 50-step DDIM grid, noise the *clean* latent afresh,
#    $z_t = \sqrt{\bar\alpha_t}\,z_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon_t$ — the levels are independent,
#    so **all of them go through the UNet in one batched call**.
# 3. A diffusers attention processor installed on the `attn2` (cross-attention) layers only keeps the
#    head-averaged softmax probabilities of the object token's column(s); self-attention keeps the fast
#    SDPA processor. Each layer's map is repeated up to the latent grid (nearest).
# 4. $\hat M$ is the plain mean over layers and levels, min-max normalised per image.
#
# **The toy world.** By default this runs offline on the project's toy world: shapes on textured
# backgrounds, and a small LDM trained by notebook 00 whose concept word is *shape*. It departs from
# Stable Diffusion on purpose, and says so: a 0-layer CLIP text encoder, cross-attention only in the
# encoder half of the UNet, a 4× VAE and 64-px images (16×16 latents). With `params/cub.yaml` the same
# code runs Stable Diffusion v1.4 on CUB.

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
from fgbg_utils.views import explorers, gallery, plots
from fgbg_utils.views import walkthrough as wt
cfg = notebook_config(globals(), stage="01")

# %% [markdown]
# ## Walkthrough: one image, in memory
#
# First the step on **one** toy image made in memory (`toy.generate_arrays`), with the model of
# `cfg.model` loaded as an `FgBgPipeline` — no run folder needed. Then the stage runs over the dataset.
#
# **The object token.** Token positions come from the model's own tokenizer (position 0 is the start
# token). A word that splits into several tokens keeps all of them; extra words in `parts` are summed
# with the object's map.

# %%
# NBVAL_CHECK_OUTPUT
from fgbg_utils.core import families, models
from fgbg_utils.core.pipeline import to_uint8
image, gt, caption = wt.toy_example()
pipe = wt.load_pipeline(cfg)
ldm = pipe.ldm
y_f = cfg.resolved_prompt
positions = families.prompt_positions(ldm, y_f, cfg.words)  # CLIP (SD, SDXL), CLIP + T5 (SD3), T5 (Flux)
print("the toy image's caption:", caption)
print("prompt y_f:", y_f, "| token positions:", positions)

# %% [markdown]
# **One UNet call, one noise level.** Put the image in the canonical frame, encode it,
# $z_0 = \kappa\,\mathcal E(x)$, and noise it to level $t$:
#
# $$z_t = \sqrt{\bar\alpha_t}\,z_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon,\qquad \varepsilon\sim\mathcal N(0, I).$$
#
# `capture_cross_attention` installs a `CrossAttentionCapture` processor on every `attn2` layer for
# the duration of the call; each keeps the head-averaged softmax column of the object token,
#
# $$\bar\psi_{t,l}[\,\cdot\,,j] = \frac{1}{N_h}\sum_{k=1}^{N_h} \operatorname{softmax}\!\Big(\frac{Q_{l,k} K_{l,k}^\top}{\sqrt{d_k}}\Big)[\,\cdot\,,j],$$
#
# over the $N_h$ heads $k$, repeated up to the $h\times h$ latent grid. Below: the maps of the first layers at one level (each
# layer has its own colour range; a layer can even look *away* from the object, which the mean over
# layers and levels averages out).

# %%
import torch
from fgbg_utils.core.attention import AttentionStore
x, frames = pipe.canvases(image)                                 # canonical frame, [-1, 1]
z0 = models.encode_images(ldm, x, "mode")                        # z_0 = κ·E(x)
den = families.denoiser(ldm, families.encode_condition(ldm, y_f))  # the model call of this family
t = den.levels(pipe.noise_levels(cfg.T0)[cfg.T0 // 2:][:1])      # a DDIM t (SD, SDXL) or σ (SD3, Flux)
eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(cfg.seed))
z_t = den.noised(z0, eps, t)                                     # z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε
store = AttentionStore(positions[cfg.object], ldm.latent_size)
with torch.no_grad(), den.capture(store):                        # capture_cross_attention on attn2
    den(z_t, t)
psi = store.stacked()[0]                                         # (layers, tokens, h, h)
canvas = to_uint8(x[0])
fig = wt.image_and_maps(canvas, {f"ψ, t = {t.item()}\n{explorers._short_layer(name)}": psi[k, 0].numpy()
                                for k, name in enumerate(store.layers[:3])}, scaled=True)

# %% [markdown]
# **$\hat M$**: `pipe.attention_maps` does the same for the $T_0$ lowest levels (one batched call),
# every layer and every object token, averages them and min-max normalises the result (docs/method.md §2.1).

# %%
maps = pipe.attention_maps(image, cfg.object, cfg.prompt, parts=cfg.parts, T0=cfg.T0, seed=cfg.seed,
                           ids=["walkthrough"], per_timestep=True, per_layer=True, per_token=True)
fig = wt.image_and_maps(canvas, {"M̂": maps.mhat[0]}, gt if gt.shape == canvas.shape[:2] else None)

# %% [markdown]
# **Explore it**: one labelled slider each for the noise level, the layer and the token (each moves
# only its own panel). In JupyterLab these are widgets; headless, static figures.

# %%
views = explorers.MapViews.from_pipeline(maps, canvas)
figs = explorers.attention_explorer(lambda _: views, ["walkthrough"], interactive)

# %% [markdown]
# ## The same image through a transformer: UNet vs MMDiT
#
# The toy world also has a small SD3-shaped MMDiT (`models/toy-dit`, `train-toy --model dit`): joint
# attention over [image, text] instead of `attn2`, flow matching (noise levels are σ). Its $\hat M$ is
# the image queries' attention on the object token, read by the same code (core/joint_attention.py).
# With `attention.aggregation: concept` (ConceptAttention, Helbling et al. 2025) the map is instead a
# softmax over concepts (here *shape* vs *background*) of the dot products between the image tokens'
# and the concept tokens' attention outputs. The titles give each map's AUC against the ground truth.
# **The toy DiT localises the object like the toy LDM** (README: held-out AUC 0.990, M_pre IoU 0.689
# with cross-attention). It took a recipe for the text: word embeddings drawn at std 1 (CLIP's 0.02
# let the image stream wash every word into the same vector), SD3's logit-normal σ (more steps at the
# noise levels where the caption matters) and 2×2 patches (4× cheaper steps, so 7,414 of them).
# Concept aggregation, measured on the same model, is inverted (held-out AUC 0.134): the image
# tokens' attention outputs sit closer to *background*'s than to *shape*'s on the object.

# %%
from fgbg_utils.views import model_compare
fig, aucs = model_compare.unet_vs_mmdit(image, gt, T0=cfg.T0, seed=cfg.seed)  # the toy world's two models

# %% [markdown]
# ## The noise levels
#
# The 50-step DDIM grid with SD's `leading` spacing and `steps_offset=1` is 981, 961, …, 21, 1; stage 01
# uses its $T_0$ lowest entries (the paper: $T_0 = 40$, so $t = 1, 21, …, 781$).

# %%
# NBVAL_CHECK_OUTPUT
grid = pipe.noise_levels(cfg.attention.grid_steps, cfg.attention.grid_steps)  # SD3/Flux: σ of the flow grid
print("T0 =", cfg.T0, "lowest levels:", sorted(grid.tolist())[:cfg.T0])

# %% [markdown]
# ## Run stage 01 over the dataset
#
# Finished images are skipped on a rerun (`force=True` recomputes). Maps go to
# `RUN/01_attention_maps/maps/<id>.npz`: $\hat M$ (normalised and raw) plus, for exploration, the
# per-noise-level, per-layer and per-token maps.

# %%
# NBVAL_SKIP
from fgbg_utils.stages.attention_maps import run as run_stage01
with gallery.reuse_note(cfg, "01"):
    summary = run_stage01(cfg, force=force)
print(f"{summary['n_images']} images, {summary['n_computed']} computed now; "
      f"{len(summary['layers'])} cross-attention layers; skipped inputs: {summary['skipped_images']}")

# %% [markdown]
# ## Image, ground truth and $\hat M$

# %%
# NBVAL_SKIP
records = gallery.records_by_id(cfg)
ids = gallery.pick_ids(cfg, cfg.evaluation.figure_images)
rows = [gallery.attention_row(cfg, i, records) for i in ids]
fig = plots.image_rows(rows, ["image", "ground truth", "M̂"])

# %% [markdown]
# ## Explore the dataset: noise levels, layers, tokens
#
# The same explorer over the run folder's maps, with a dropdown for the image.

# %%
# NBVAL_SKIP
figs = explorers.attention_explorer(lambda i: explorers.MapViews.from_run(cfg, i, records), ids, interactive)
