# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · The study: does each step of the paper hold, beyond one draw?
#
# One run of the pipeline (notebooks 01–06) is **one draw**: one toy world (the images, the masks
# the method derives from them, $m'$, $D'$) and one initialisation of every segmentation U-Net. A
# U-Net row moves by a few IoU points when only its init seed changes, so a single Table 2 cannot
# say whether a step of the paper (refinement, the U-Net, the synthetic pairs) really helps.
#
# The study repeats the whole method on $W$ toy worlds (`dataset.seed`) and trains every U-Net row
# with $S$ init seeds (`segmentation.seed`):
#
# ```bash
# python -m fgbg_utils study params/toy.yaml --worlds 0,1,2 --unet-seeds 0,1,2 --out runs/study
# ```
#
# Each world is a normal run folder (`runs/study/world-<w>/`, resumable, reused by fingerprint);
# the extra seeds' U-Nets train from that world's finished stages. The validation world
# (`dataset.seed=100`), on which the toy settings were chosen, is never one of the reported worlds.
#
# **Rows.** For a row with values $x_{w,k}$ (world $w$, seed $k$), each world's mean
# $\bar x_w = \frac1S\sum_k x_{w,k}$ is one replicate (a world changes everything downstream, a seed
# only the U-Net), and the 95 % interval is the Student-$t$ interval over the $W$ world means:
# $\bar x \pm t_{0.975,\,W-1}\, s(\bar x_w)/\sqrt W$.
#
# **Steps.** A claim "$A < B$" is judged on the **paired** differences $d_{w,k} = x^B_{w,k} - x^A_{w,k}$
# (same world, same seed), with the same interval. It **holds** if the interval lies above 0,
# **fails** if it lies below, and is **unresolved** if it spans 0. Pairing removes the world-to-world
# spread that the rows' own intervals carry, so a step can hold even where the rows' intervals overlap.

# %% tags=["parameters"]
# Parameters: papermill injects values after this cell.
study_dir = "runs/study"  # the study folder (relative: project root), made by `python -m fgbg_utils study`

# %%
# %matplotlib inline
from IPython.display import Markdown, display
from fgbg_utils.views import study_views as views
study = views.load_study(study_dir)
if study is None:
    print(f"No study in {study_dir}. Make it with:\n  python -m fgbg_utils study params/toy.yaml "
          f"--worlds 0,1,2 --unet-seeds 0,1,2 --out {study_dir}")
else:
    print(f"{len(study['worlds'])} worlds {study['worlds']} × {len(study['unet_seeds'])} U-Net seeds "
          f"{study['unet_seeds']}, parameters {study['params_file']} {' '.join(study['overrides'])}; "
          f"{study['seconds'] / 60:.0f} min of compute")

# %% [markdown]
# ## Table 2 with error bars
#
# Each row's mean foreground IoU (pooled over the test images, in %) with its 95 % interval; the small
# dots are the individual (world, seed) values, the squares the paper's CUB numbers. The toy world is
# easier than CUB in absolute terms (simple shapes on textured backgrounds), so compare the **order**
# of the rows, not their levels.

# %%
if study is not None:
    fig = views.rows_figure(study)

# %% [markdown]
# ## The paper's steps, paired
#
# The difference each step makes, paired by world and seed. Green: the step holds; red: it fails;
# grey: unresolved at this number of worlds. The object-free step is a share of samples (0–1), not an IoU.

# %%
if study is not None:
    fig = views.steps_figure(study)

# %% [markdown]
# ## What held, and what did not
#
# The sentences below are written from the numbers of this study, not by hand.

# %%
if study is not None:
    display(Markdown(views.verdict_sentences(study)))

# %% [markdown]
# The same tables are in `runs/study/study.md` (and in the README's Results). A step that is
# unresolved needs more worlds: its interval's width shrinks with $1/\sqrt{W}$ and with $t_{0.975,W-1}$
# (4.30 at three worlds, 2.78 at five).
