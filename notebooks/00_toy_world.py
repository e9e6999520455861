# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · The toy world: a dataset and a text-to-image LDM made offline
#
# Stable Diffusion and CUB cannot be downloaded here or in CI, so the default run uses a world the
# project makes itself, small enough for a CPU and with exact ground truth:
#
# * **Images**: 64×64 px, one shape (circle, square, rotated triangle) of one of 8 colours and radius
#   8–20 px on a textured background (flat, gradient, soft or hard stripes, smooth noise, checker),
#   plus pixel noise. Masks are exact. Captions use specific words (*"a photo of a red circle"*) or the
#   one concept word (*"a photo of a shape"*), the way the paper merges bird species into *bird*;
#   15 % of the training images are background only (*"a photo of a background"*).
# * **Model**, built from the real classes and saved with `save_pretrained` (safetensors), so it loads
#   with `StableDiffusionPipeline.from_pretrained(folder)` exactly like Stable Diffusion:
#   `AutoencoderKL` (4× down, 4 latent channels), `UNet2DConditionModel` (16×16 latents), a
#   `CLIPTextModel`, a word-level tokenizer built locally, and SD v1's scaled-linear β schedule
#   (DDIM scheduler config, `steps_offset=1`).
#
# New to diffusion models? Notebook 00b (the diffusion primer) defines every term and symbol used
# here and in 01–06, on this model.
#
# **Departures from Stable Diffusion, on purpose** (the trials behind them: docs/method.md §8): the text encoder
# has **0 transformer layers** (token + position embeddings and the final norm), so only the object
# token carries the object — with a causal encoder the end and padding tokens carried it too; the UNet
# has **cross-attention only in its encoder half** (two layers, at 16×16 and 8×8) — decoder-side
# layers had unstable sign at this scale and cancelled the others in the mean.
#
# **Training** (the shipped `models/toy-ldm` was made by exactly this code): the VAE first, on random
# 32×32 crops (L1 + MSE, tiny KL), then frozen; `scaling_factor` = 1/std of the latents is written into
# its config. Then UNet and text encoder jointly: ε-prediction, uniform $t$, 10 % caption dropout (for
# guidance), AdamW, warm-up + cosine, batch 32, gradient clipping, an EMA of the UNet. Each part is
# time-boxed: the step count is planned from the measured step time.
#
# Set `train = True` to retrain: about 78 min of one CPU thread for the whole recipe (VAE 10, phase 1
# 20, phase 2 48 min; the shipped snapshot was reached after 49 min), plus the selection runs;
# `python -m fgbg_utils train-toy` does the same from a shell. With `train = False` the notebook shows the shipped model.

# %% tags=["parameters"]
# With train = False the notebook shows the shipped model; True retrains it with the recipe that
# made it (about 78 min of one CPU thread, see above).
train = False                          # True: train a new toy model into out_dir
out_dir = "../runs/toy-ldm-retrained"  # where a retrained model goes (copy to models/toy-ldm to ship)
work_dir = "../runs/toy-ldm-work"      # phase 1, phase-2 snapshots and the validation runs
model_dir = "../models/toy-ldm"        # the model to inspect
n_images = 20000                       # training corpus per phase
vae_minutes = 10
phase1_minutes = 20
phase2_minutes = 50
threads = 1

# %%
# %matplotlib inline
import json
from pathlib import Path
import matplotlib.pyplot as plt
plt.rcParams["figure.dpi"] = 72
from fgbg_utils.data import toy
from fgbg_utils.runs.notebook import quiet_libraries
quiet_libraries()  # known harmless library messages
from fgbg_utils.views import plots

# %% [markdown]
# ## Samples of the dataset generator

# %%
images, masks, captions, _ = toy.generate_arrays(8, seed=0, background_fraction=0.15)
rows = [{"label": c.replace("a photo of a ", ""), "image": i, "mask": m} for i, m, c in zip(images, masks, captions)]
fig = plots.image_rows(rows[:4], ["image", "mask"])

# %% [markdown]
# ## The model's layout, and why
#
# The shipped model is Stable Diffusion's architecture made small (docs/method.md §8): a VAE with
# factor 4 (64 px → 4×16×16 latents), a CLIP text encoder with **0 transformer layers** (so only the
# object token carries the object: with a causal encoder the end and padding tokens carried it and
# the object column pointed elsewhere), and a UNet with cross-attention **only in its first two down
# blocks** (decoder-side layers had unstable sign and cancelled the others in the mean over layers).
# The cell reads the layout from the saved model itself:

# %%
from fgbg_utils import FgBgPipeline
from fgbg_utils.views.walkthrough import quiet_diffusers
with quiet_diffusers():
    pipe = FgBgPipeline.from_pretrained(model_dir, device="cpu")
info = json.loads((Path(model_dir) / "training_info.json").read_text())
ldm = pipe.ldm
print("arch (training_info.json):", info["arch"])
print(f"resolution {ldm.resolution} px, latents {ldm.unet.config.in_channels}×{ldm.latent_size}×{ldm.latent_size}, "
      f"VAE factor {ldm.vae_factor}, text-encoder layers {ldm.text_encoder.config.num_hidden_layers}")
print("cross-attention (attn2) layers:", [n for n in ldm.unet.attn_processors if "attn2" in n])
print({k: f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f} M parameters"
       for k, m in (("vae", ldm.vae), ("unet", ldm.unet), ("text_encoder", ldm.text_encoder))})

# %% [markdown]
# ## Train (optional)
#
# The recipe (`fgbg_utils.training.toy_recipe.train_toy_recipe`): phase 1 on generator v1 (VAE, then
# UNet + text encoder), phase 2 on generator v2 with EMA snapshots, and the snapshot with the best
# $M_{pre}$ IoU on a validation world (never used for reporting) is installed in `out_dir`.

# %%
if train:
    from fgbg_utils.training.toy_recipe import train_toy_recipe
    info = train_toy_recipe(out_dir, work_dir, n_images=n_images, threads=threads, vae_minutes=vae_minutes,
                            phase1_minutes=phase1_minutes, phase2_minutes=phase2_minutes)
    model_dir = out_dir

# %% [markdown]
# ## How the model was trained: time and loss curves

# %%
info = json.loads((Path(model_dir) / "training_info.json").read_text())
print(f"about {info['total_minutes']} min of one CPU core in all")
for name, phase in info.get("phases", {}).items():
    print(f"phase {name}:", phase)
if "selection" in info:
    print("selection:", info["selection"]["rule"])
    print("validation IoU by step:", {k: v for k, v in info["selection"].items() if k.startswith("validation")})
first = info.get("continued_from") or info
vae = first["vae"]["curve"]
unet = first["unet"]["curve"] if info.get("continued_from") else []
offset = unet[-1]["step"] if unet else 0
unet2 = [dict(p, step=p["step"] + offset) for p in info.get("selection", {}).get("phase2_full_curve", info["unet"]["curve"])]
fig, axes = plt.subplots(1, 2, figsize=(9, 2.8))
axes[0].plot([p["step"] for p in vae], [p["loss"] for p in vae]); axes[0].set_title("VAE loss (L1 + MSE)")
axes[1].plot([p["step"] for p in unet], [p["loss"] for p in unet], label="phase 1")
axes[1].plot([p["step"] for p in unet2], [p["loss"] for p in unet2], label="phase 2")
if "selection" in info:
    axes[1].axvline(offset + info["selection"]["selected_step"], color="tab:red", ls="--", label="shipped")
axes[1].set_title("UNet ε-loss"); axes[1].legend(fontsize=8)
for ax in axes:
    ax.set_yscale("log"); ax.set_xlabel("step"); ax.grid(alpha=0.3)
fig.tight_layout()

# %% [markdown]
# ## What the model draws (DDIM, 50 steps, classifier-free guidance $w = 3$ against the empty prompt; notebook 00b)

# %%
import torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(model_dir)
prompts = ["a photo of a red circle", "a photo of a blue square", "a photo of a yellow triangle",
           "a photo of a shape", "a photo of a background"]
out = pipe(prompts, num_inference_steps=50, guidance_scale=3.0, output_type="np",
           generator=torch.Generator().manual_seed(0)).images
fig, axes = plt.subplots(1, len(prompts), figsize=(2 * len(prompts), 2.3))
for ax, im, p in zip(axes, out, prompts):
    ax.imshow(im); ax.set_title(p.replace("a photo of a ", ""), fontsize=8); ax.axis("off")

# %% [markdown]
# ## Where the model looks: $\hat M$ of the word *shape*
#
# The method's first step (notebook 01) on a few generated images: the model's cross-attention to the
# concept word, averaged over the 40 lowest noise levels and both layers.

# %%
from fgbg_utils.views.plots import image_rows
images, masks, captions, _ = toy.generate_arrays(4, seed=1)
with quiet_diffusers():
    pipe = FgBgPipeline.from_pretrained(model_dir, device="cpu")  # the retrained model when train = True
maps = pipe.attention_maps(images, "shape", ids=[f"toy-{k}" for k in range(len(images))])
rows = [{"label": c.replace("a photo of a ", ""), "image": i, "mask": m, "M̂": h}
        for i, m, c, h in zip(images, masks, captions, maps.original())]
fig = image_rows(rows, ["image", "mask", "M̂"])
