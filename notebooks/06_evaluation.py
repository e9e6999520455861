# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Evaluation: the paper's Table 2 on your data
#
# The purpose of the method is a segmentation model trained **without mask labels**. A from-scratch
# U-Net (docs/method.md §2.6: DoubleConv blocks, max-pool downs, transposed-conv ups with skips; BCE on the
# soft label, Adam, a fixed number of steps, the last weights; joint crop + flip augmentation) is
# trained on
#
# * $(D, M_{pre})$ — the preliminary masks,
# * $D_s = (D, M)$ — the refined masks,
# * $D_s \cup D'_s$ — plus the synthetic pairs of notebook 05,
# * and, for reference only, the ground truth (**supervised**, an upper bound).
#
# Each is scored on the held-out split beside the direct masks $M_{pre}$, $M_{crop}$ and $M$: pooled
# pixel ACC, foreground IoU and mIoU $=(IoU_{fg}+IoU_{bg})/2$ as in the paper, per-image mean IoU and
# Dice (another protocol, not comparable to the pooled numbers), and the IoU of the tight bounding boxes.
#
# The toy default is a small U-Net (width 16, depth 3, 64 px, cosine learning rate, bf16 autocast
# where the CPU has it): each label-free row is an **ensemble** of 4 such networks trained 100 steps
# each (early stopping suits noisy pseudo-labels; the average of 4 draws is less noisy than one),
# their probabilities averaged; the supervised row is one network of 300 steps. The paper's
# setting (one network, width 64, depth 4, 128 px, 12,000 steps, batch 32, constant lr, float32)
# is the default of the real-data parameter files. The outputs stored in this notebook are those of
# the default run (`make demo`, `runs/toy`), the README's default-run column.

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
from IPython.display import Markdown, display
from fgbg_utils.runs.notebook import notebook_config
from fgbg_utils.views import evaluation_views as views
from fgbg_utils.views import gallery
cfg = notebook_config(globals(), stage="06", missing="warn")  # the row table below needs no run

# %% [markdown]
# ## What Table 2's rows are
#
# | row | what it is | labels used |
# |---|---|---|
# | $M_{pre}$ | the preliminary masks of notebook 02 (GMM on $\hat M$), scored directly | none |
# | $M_{crop}$ | refinement with a mirrored background strip instead of $m'$ (baseline) | none |
# | U-Net$(D, M_{pre})$ | a U-Net trained on the images with $M_{pre}$ as labels | none |
# | $M$ | the refined masks of notebook 04, scored directly | none |
# | U-Net$(D_s)$ | a U-Net trained on $D_s = (D, M)$ | none |
# | U-Net$(D_s \cup D'_s)$ | the same plus the synthetic pairs of notebook 05 | none |
# | supervised | a U-Net trained on the ground-truth masks: the upper bound | **ground truth** |
#
# Every row is *scored* against ground truth on the evaluation split; only the last one *trains* on it.
# The label-free U-Nets are the method's product: a segmenter for new images.

# %%
# NBVAL_SKIP
from fgbg_utils.stages import evaluation as stage_evaluation
with gallery.reuse_note(cfg, "06"):
    result = stage_evaluation.run(cfg, force=force, progress=False, log=gallery.run_log(cfg))

# %% [markdown]
# ## Table 2
#
# This run's foreground IoU beside the paper's CUB numbers (Table 2), both in percent. The ordering
# the method should keep: $M_{pre} < M <$ U-Net$(D_s) \le$ U-Net$(D_s \cup D'_s) <$ supervised; whether
# each step held on this run is computed from the numbers below the chart.

# %%
# NBVAL_SKIP
fig = views.table2_figure(cfg)

# %%
# NBVAL_SKIP
from fgbg_utils.runs.runner import metrics_table
display(Markdown(views.table2_report(result)))
print(result["n_test_scored"], "test images scored; all metrics (fractions, not percent):")
display(Markdown(metrics_table(cfg.run_dir)))

# %% [markdown]
# ## Table 1: against an unsupervised baseline
#
# The paper's Table 1 compares the method with unsupervised segmenters on CUB. The one we can run
# offline is **GrabCut** (OpenCV's `cv2.grabCut`, initialised with a centred rectangle; margin and
# iterations chosen on the validation world: `evaluation.grabcut_*`). It is scored like every other row;
# the other baselines of the table are listed as not run.

# %%
# NBVAL_SKIP
from fgbg_utils.views import evidence
print(evidence.table1(cfg.run_dir))

# %% [markdown]
# ## Training curves

# %%
# NBVAL_SKIP
fig = views.training_curves(cfg)

# %% [markdown]
# ## Best and worst test images of U-Net$(D_s \cup D'_s)$

# %%
# NBVAL_SKIP
row = next((r for r in ("unet_D_s_plus_synth", "unet_D_s", "M") if r in result["rows"]), None)
if row:
    fig = views.best_worst(cfg, row, best=3, worst=3)
else:
    from fgbg_utils.views.gallery import no_ground_truth
    no_ground_truth(result.get("note", "no rows were scored"))

# %% [markdown]
# ## Explore: every row's mask on one test image (interactive in JupyterLab)

# %%
# NBVAL_SKIP
views.prediction_explorer(cfg, interactive=interactive)

# %% [markdown]
# ## The product: segment new images without labels
#
# `Segmenter.from_run` loads the run's label-free U-Net (U-Net$(D_s \cup D'_s)$ when trained, else
# U-Net$(D_s)$) and maps images of any size to masks. From a shell, for a folder of images:
#
# ```
# python -m fgbg_utils predict --run runs/toy --images my_photos/ --out my_masks/ --overlay
# ```

# %%
# NBVAL_SKIP
from fgbg_utils.data import toy
from fgbg_utils.runs.predict import Segmenter, overlay
seg = Segmenter.from_run(cfg.run_dir)
new_images, _, _, _ = toy.generate_arrays(4, seed=12345)   # images no stage has seen
masks = seg.predict(list(new_images))
fig = views._grid([[im / 255, overlay(im, m) / 255] for im, m in zip(new_images, masks)],
                  [f"new {k}" for k in range(len(masks))], ["image", f"{seg.row}: mask"], size=1.6)

# %% [markdown]
# ## Are the background samples object-free?
#
# The supervised U-Net, trained on ground truth, serves as an independent object detector: a sample
# counts as object-free when it predicts less than `segmentation.detector_area` of the image as
# object. `real_test_detected` is its detection rate on real test images (all of which contain the
# object). Samples from notebook 03 ($m$ and $m'$ with $y_f$, $y_b$, and $y_b$ contrasted against
# $y_f$) and the pure backgrounds of notebook 05.

# %%
# NBVAL_SKIP
display(Markdown(views.object_free_report(result.get("object_free_check", {}), cfg.finetune.eval_guidance)))
