# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00b · A diffusion primer on the toy model
#
# Everything the later notebooks use, on the shipped toy model (`models/toy-ldm`, the same
# diffusers classes as Stable Diffusion, notebook 00), in about a minute of CPU: the forward noising
# and $\bar\alpha_t$, the $\varepsilon$ objective, a ten-line DDIM loop, classifier-free guidance, and
# cross-attention with the object token's column. Every symbol of notebooks 01–06 is defined here
# (in **bold** where it is defined), or where it first appears; `docs/method.md` §0 lists them all.
# This notebook is not a run stage: it reads no run folder and writes nothing.

# %% tags=["parameters"]
model_dir = "../models/toy-ldm"  # the model to study (a diffusers folder)
seed = 0                         # every random draw below starts from it

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import torch
from fgbg_utils.runs.notebook import quiet_libraries
quiet_libraries()  # known harmless library messages
from fgbg_utils import FgBgPipeline
from fgbg_utils.core import models
from fgbg_utils.views import walkthrough as wt
plt.rcParams["figure.dpi"] = 72
torch.set_grad_enabled(False)  # inference only: no gradients anywhere in this notebook
with wt.quiet_diffusers():
    pipe = FgBgPipeline.from_pretrained(model_dir, device="cpu")
ldm = pipe.ldm  # vae, unet, text_encoder, tokenizer, scheduler

# %% [markdown]
# ## 1. The latent space
#
# A *latent* diffusion model (LDM) works on a compressed image. The VAE's **encoder $\mathcal E$** maps
# an image $x\in[-1,1]^{3\times R\times R}$ (**$R$**: the model's resolution, 64 px here, 512 for SD 1.x)
# to a latent $z_0 = \kappa\,\mathcal E(x)$ of **$C$** channels and side **$h = R/f$** (**$f$**: the VAE
# factor, 4 here, 8 for SD; **$\kappa$**: the VAE's `scaling_factor`, which brings the latents to about
# unit variance). The **decoder $\mathcal D$** maps back: $x \approx \mathcal D(z_0/\kappa)$.

# %%
# NBVAL_CHECK_OUTPUT
image, gt, caption = wt.toy_example()               # a fixed toy image, made in memory
x, frames = pipe.canvases(image)                    # (1, 3, R, R) in [-1, 1]
z0 = models.encode_images(ldm, x, "mode")           # z_0 = κ·E(x), the posterior mean
kappa = ldm.vae.config.scaling_factor
print(f"caption: {caption!r}; x {tuple(x.shape)}, z_0 {tuple(z0.shape)}: R = {ldm.resolution}, "
      f"f = {ldm.vae_factor}, C = {z0.shape[1]}, h = {ldm.latent_size}, κ = {kappa:.3f}")

# %% [markdown]
# ## 2. Forward noising and $\bar\alpha_t$
#
# Training corrupts $z_0$ in **$T$ = 1000** small steps $t = 1, \dots, T$ with a fixed variance schedule
# **$\beta_t$** (SD's "scaled linear" schedule). With **$\alpha_t = 1-\beta_t$** and
# **$\bar\alpha_t = \prod_{k\le t}\alpha_k$** the noised latent at **noise level (timestep) $t$** has a closed
# form, so any level is reached in one draw:
#
# $$z_t = \sqrt{\bar\alpha_t}\,z_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon,\qquad \varepsilon\sim\mathcal N(0, I).$$
#
# $\bar\alpha_t$ falls from almost 1 (a clean latent) to almost 0 (pure noise). diffusers' `add_noise` is
# exactly this formula:

# %%
# NBVAL_CHECK_OUTPUT
sched = ldm.scheduler
abar = sched.alphas_cumprod                          # ᾱ_t for t = 0 … T−1 (diffusers counts from 0)
eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
levels = [1, 101, 301, 601, 981]
z_ts = {t: abar[t].sqrt() * z0 + (1 - abar[t]).sqrt() * eps for t in levels}
for t in levels:
    assert torch.allclose(z_ts[t], sched.add_noise(z0, eps, torch.tensor([t])), atol=1e-5)
print("ᾱ_t at t =", {t: round(float(abar[t]), 4) for t in levels})
fig, axes = plt.subplots(1, 2 + len(levels), figsize=(2.0 * (2 + len(levels)), 2.2))
axes[0].plot(abar.numpy()), axes[0].set_title("ᾱ_t", fontsize=8), axes[0].set_xlabel("t")
axes[1].imshow(image), axes[1].set_title("x", fontsize=8)
for ax, t in zip(axes[2:], levels):
    ax.imshow(wt.decode(ldm, z_ts[t])), ax.set_title(f"D(z_t/κ), t = {t}", fontsize=8)
for ax in axes[1:]:
    ax.axis("off")
fig.tight_layout()

# %% [markdown]
# ## 3. The $\varepsilon$ objective
#
# The denoiser is a UNet **$\varepsilon_\theta(z_t, t, c)$** with weights **$\theta$**: given $z_t$, the level
# $t$ and a text condition $c$, it predicts the noise $\varepsilon$ that was added. The text is a prompt
# **$y$**, tokenised and embedded by the **text encoder $\tau_\theta$** (CLIP's), $c = \tau_\theta(y)$: one
# vector per token. Training minimises, over images, uniform $t$ and fresh noise,
#
# $$\mathcal L_{\varepsilon} = \mathbb E_{z_0, y, t, \varepsilon}\,\big\|\varepsilon - \varepsilon_\theta(z_t, t, \tau_\theta(y))\big\|^2 .$$
#
# The pretrained model **$m$** is such a trained $(\mathcal E, \mathcal D, \tau_\theta, \varepsilon_\theta)$; its
# fine-tuned copy **$m'$** (notebook 03) changes $\theta$ only. The prompts of the method are the object
# prompt **$y_f$** (*"a photo of a shape"*; a bird on CUB) and the background prompt **$y_b$**
# (*"a photo of a background"*). A trained model predicts the noise far better than guessing 0
# (whose error is $\mathbb E\|\varepsilon\|^2 = 1$ per element), and best at high noise, where $z_t$ is
# nearly all noise:

# %%
# NBVAL_CHECK_OUTPUT
y_f, y_b = "a photo of a shape", "a photo of a background"
c_f = models.encode_prompt(ldm, y_f)                     # τ_θ(y_f): (1, tokens, width)
with torch.no_grad():
    for t in levels:
        eps_hat = ldm.unet(z_ts[t], torch.tensor([t]), encoder_hidden_states=c_f).sample
        print(f"t = {t:3d}: mean (ε − ε_θ)² = {float(((eps - eps_hat) ** 2).mean()):.3f}")

# %% [markdown]
# ## 4. Sampling: a ten-line DDIM loop
#
# To draw a new image, start from noise $z_T$ and step down a short grid of levels. **DDIM** (denoising
# diffusion implicit models) with **$\eta = 0$** (**$\eta$**: the amount of fresh noise per step; 0 makes
# sampling deterministic) estimates the clean latent from the predicted noise, then re-noises it to
# the next, lower level $t'$:
#
# $$\hat z_0 = \frac{z_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon}{\sqrt{\bar\alpha_t}},\qquad
# z_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat z_0 + \sqrt{1-\bar\alpha_{t'}}\,\hat\varepsilon .$$
#
# SD's **50-step grid** is $t = 981, 961, \dots, 21, 1$ (`leading` spacing, `steps_offset` 1); the method
# uses this grid everywhere. The loop below is checked against the project's sampler
# (`core.synthesis.sample_guided`, which follows diffusers' `DDIMScheduler.step`):

# %%
# NBVAL_CHECK_OUTPUT
from diffusers import DDIMScheduler
from fgbg_utils.core.synthesis import initial_latents, sample_guided


@torch.no_grad()
def ddim(eps_fn, z, steps=50):
    """DDIM, η = 0, from noise z on the `steps`-step grid; eps_fn(z_t, t) is the model's ε̂."""
    grid = DDIMScheduler.from_config(sched.config)
    grid.set_timesteps(steps)
    ts = grid.timesteps.tolist()
    for t, t_next in zip(ts, ts[1:] + [None]):
        a_t = abar[t]
        a_next = abar[t_next] if t_next is not None else grid.final_alpha_cumprod
        e = eps_fn(z, t)
        z0_hat = (z - (1 - a_t).sqrt() * e) / a_t.sqrt()            # ẑ_0
        z = a_next.sqrt() * z0_hat + (1 - a_next).sqrt() * e       # z_{t'}
    return z


unet_eps = lambda c: (lambda z, t: ldm.unet(z, torch.tensor([t]), encoder_hidden_states=c).sample)
z_T = initial_latents(ldm, [seed])                           # z_T ~ N(0, I), one generator per image
ours = ddim(unet_eps(c_f), z_T)
_, theirs = sample_guided(ldm, y_f, y_b, 1.0, [seed])        # s = 1: plain y_f sampling (below)
assert torch.allclose(ours, theirs, atol=1e-4), float((ours - theirs).abs().max())
print("the 10-line loop equals the project's sampler: max |Δz_0| =", f"{float((ours - theirs).abs().max()):.1e}")
fig = wt.strip_figure([wt.decode(ldm, z_T), wt.decode(ldm, ours)], ["z_T (decoded)", f"sample of {y_f!r}"], size=2.0)

# %% [markdown]
# ## 5. Classifier-free guidance (CFG), and the one guidance convention
#
# A model trained with its caption dropped now and then (10 % of the toy model's steps) predicts
# noise both with and without a prompt. **Classifier-free guidance** combines two predictions of the
# same $z_t$ and extrapolates from one prompt toward the other. diffusers writes it with a prompt
# $y$, a negative prompt $y^-$ (empty: the unconditional prediction) and **`guidance_scale` $w$**:
#
# $$\hat\varepsilon = \varepsilon_\theta(z_t, t, \tau_\theta(y^-)) + w\,\big(\varepsilon_\theta(z_t, t, \tau_\theta(y)) - \varepsilon_\theta(z_t, t, \tau_\theta(y^-))\big).$$
#
# **The one convention of notebooks 03–05.** The method only ever guides between $y_f$ and $y_b$, so
# every guided prediction in this project is written with one **concept scale $s$**, the weight on the
# object direction:
#
# $$\boxed{\hat\varepsilon = \varepsilon(y_b) + s\,\big(\varepsilon(y_f) - \varepsilon(y_b)\big)}$$
#
# ($\varepsilon(y)$ short for $\varepsilon_\theta(z_t, t, \tau_\theta(y))$). $s = 1$ is plain $y_f$, $s = 0$ plain
# $y_b$, $s > 1$ a stronger object, $s < 0$ pushes away from the object: object-free backgrounds.
# A diffusers call with prompt $y_b$, negative prompt $y_f$ and scale $w$ is the same formula with
# $s = 1 - w$. The parameter files keep each library's own number; this is what each one means in $s$:

# %%
# NBVAL_CHECK_OUTPUT
from fgbg_utils import load_params
from fgbg_utils.views.primer import guidance_convention
cfg = load_params("../params/toy.yaml", run_dir="../runs/toy")
for row in guidance_convention(cfg):
    print(f"{row['parameter']:30s} = {row['value']:5g}  ({row['how']})  ->  s = {row['s']:g}")

# %% [markdown]
# The same initial noise $z_T$ under $s = -2, 0, 1, 2, 4$ (the primer's own loop with guidance added:
# two UNet calls per step). The pretrained $m$ already knows *background* from its background-only
# training images; notebook 03 teaches it more.

# %%
# NBVAL_CHECK_OUTPUT
c_b = models.encode_prompt(ldm, y_b)
eps_s = lambda s: (lambda z, t: (e_b := unet_eps(c_b)(z, t)) + s * (unet_eps(c_f)(z, t) - e_b))
scales = [-2, 0, 1, 2, 4]
samples = {s: ddim(eps_s(s), z_T) for s in scales}
assert torch.allclose(samples[1], ours, atol=1e-4)   # s = 1 is plain y_f
fig = wt.strip_figure([wt.decode(ldm, z) for z in samples.values()], [f"s = {s}" for s in scales],
                      "ε̂ = ε(y_b) + s (ε(y_f) − ε(y_b)), one z_T", size=1.8)

# %% [markdown]
# ## 6. Cross-attention: where the model reads the prompt
#
# Inside $\varepsilon_\theta$ the UNet's intermediate features **$\varphi(z_t)$** (one vector per latent
# pixel) read the text through **cross-attention** layers (diffusers' `attn2`). In a layer $l$ from the
# set **$\mathcal A$** of cross-attention layers, with learned projections $W_Q, W_K, W_V$:
#
# $$Q = W_Q\,\varphi(z_t),\quad K = W_K\,\tau_\theta(y),\quad V = W_V\,\tau_\theta(y),\qquad
# \psi_{t,l} = \operatorname{softmax}\!\Big(\frac{Q K^\top}{\sqrt{d_k}}\Big),\qquad \text{output} = \psi_{t,l}\,V,$$
#
# per attention head (**$N_h$** heads, each of width **$d_k$**). **$\psi_{t,l}$** has one row per latent
# pixel and one column per token: row $p$ says how pixel $p$ distributes its attention over the
# prompt's tokens. **The object token's column** $\psi_{t,l}[\,\cdot\,, j]$ ($j$: the token of the object
# word) is a map over the pixels: *where the model reads "shape"*. Computed by hand from the first
# layer's $Q$ and $K$, and checked against the project's capture processor (`core.attention`), which
# keeps the head mean of that column. One layer at one level can even look *away* from the object;
# the mean over layers and levels, notebook 01's $\hat M$ (right), is what the method uses:

# %%
# NBVAL_CHECK_OUTPUT
from fgbg_utils.core import tokens
from fgbg_utils.core.attention import AttentionStore, capture_cross_attention
from fgbg_utils.views.primer import attention_inputs
j = tokens.prompt_positions(ldm.tokenizer, y_f, ["shape"])["shape"]          # the object's token(s)
t = 301
layer, phi, ctx = attention_inputs(ldm.unet, z_ts[t], t, c_f)                 # first attn2: φ(z_t), τ_θ(y_f)
n_h = layer.heads
Q = layer.to_q(phi).unflatten(-1, (n_h, -1)).transpose(1, 2)                  # (1, N_h, pixels, d_k)
K = layer.to_k(ctx).unflatten(-1, (n_h, -1)).transpose(1, 2)                  # (1, N_h, tokens, d_k)
d_k = Q.shape[-1]
psi = torch.softmax(Q @ K.transpose(-1, -2) / d_k ** 0.5, dim=-1)            # ψ: (1, N_h, pixels, tokens)
column = psi[0, :, :, j].mean(0).sum(-1)                                     # head mean of the object column
side = int(column.numel() ** 0.5)
store = AttentionStore(j, ldm.latent_size)
with torch.no_grad(), capture_cross_attention(ldm.unet, store):
    ldm.unet(z_ts[t], torch.tensor([t]), encoder_hidden_states=c_f)
captured = store.maps[0][0].sum(0)[::ldm.latent_size // side, ::ldm.latent_size // side]
assert torch.allclose(column.reshape(side, side), captured, atol=1e-5)
print(f"layer {store.layers[0]}: N_h = {n_h}, d_k = {d_k}, Q {tuple(Q.shape)}, K {tuple(K.shape)}, "
      f"object token j = {j}; each row of ψ sums to 1: {bool(torch.allclose(psi.sum(-1), torch.ones(1)))}")
mhat = pipe.attention_maps(image, "shape", T0=40, seed=seed).mhat[0]              # notebook 01's M̂
fig = wt.image_and_maps(wt.decode(ldm, z0), {f"ψ[·, j], t = {t}, layer 1": column.reshape(side, side).numpy(),
                                             "M̂: mean over A and 40 levels": mhat}, scaled=True)

# %% [markdown]
# ## 7. From here to the method
#
# * **$\hat M$** (notebook 01) is this object column, averaged over the layers $\mathcal A$ and the
#   **$T_0$** lowest levels of the 50-step grid ($t = 1, 21, \dots$), then min-max normalised.
# * **EMA** (exponential moving average, notebooks 00 and 03): during training a second copy of the
#   weights follows $\bar\theta \leftarrow \lambda\,\bar\theta + (1-\lambda)\,\theta$ after every step
#   (decay $\lambda$ close to 1); the averaged weights $\bar\theta$ are smoother than the last step's and
#   are the ones saved.
# * Fine-tuning (03) minimises $\mathcal L_\varepsilon$ on chosen pixels only; refinement (04) repaints
#   pixels with DDIM while keeping the others; synthesis (05) is DDIM with the concept scale $s$.
