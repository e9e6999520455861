"""Stages 01-05 end to end on a tiny SD-2-shaped v-prediction model (tests/fixtures/make_tiny_sd2.py,
built into a temporary folder) and a tiny toy dataset: every stage finishes, the fine-tuning of
stage 03 regresses on v, m' keeps the v scheduler, and stage 05's synthetic images are real
images (finite, not constant, not all alike) that equal diffusers' StableDiffusionPipeline with
m' at the same latents (concept guidance = CFG with y_b as the negative prompt), and differ from
the same model read as ε."""
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fgbg_utils import load_params
from fgbg_utils.core import seeds, synthesis
from fgbg_utils.stages import attention_maps, binarization, finetuning, refinement
from fgbg_utils.stages import synthesis as stage_synthesis
from fgbg_utils.stages.common import load_pipeline
from fgbg_utils.training import objective

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GUIDANCE, STEPS = 2.0, 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    sys.path.insert(0, str(FIXTURES))
    import make_tiny_sd2

    tmp = tmp_path_factory.mktemp("vpred-stages")
    model = make_tiny_sd2.main(["--out", str(tmp / "tiny-sd2")])
    cfg = load_params(None, {
        "model.path": str(model), "object": "shape", "prompt": "a photo of a {object}",
        "device": "cpu", "dtype": "float32", "dataset.kind": "toy", "dataset.n_train": 3,
        "dataset.n_test": 2, "dataset.image_size": 32, "T0": 5, "attention.sweep": False,
        "finetune.max_train_steps": 2, "finetune.batch_size": 2, "finetune.eval_samples": 2,
        "finetune.eval_steps": 2, "refinement.steps": STEPS, "synthesis.n_images": 3,
        "synthesis.steps": STEPS, "synthesis.guidance": GUIDANCE, "synthesis.background_images": 1,
        "synthesis.sweep_seeds": 1, "synthesis.sweep_scales": [0, 1]}, run_dir=str(tmp / "run"))
    targets = []
    real_target = objective.prediction_target

    def spy(noise_scheduler, z0, noise, t):
        targets.append(noise_scheduler.config.prediction_type)
        return real_target(noise_scheduler, z0, noise, t)

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate GMMs of a random model are expected here
        mp.setattr(objective, "prediction_target", spy)
        results = {s.__name__.rsplit(".", 1)[-1]: s.run(cfg, progress=False)
                   for s in (attention_maps, binarization, finetuning, refinement, stage_synthesis)}
    return cfg, results, targets


def test_stages_finish_and_finetuning_regresses_on_v(run):
    cfg, results, targets = run
    assert targets and set(targets) == {"v_prediction"}
    for n in ("01", "02", "03", "04", "05"):
        stage = next(Path(cfg.run_dir).glob(f"{n}_*"))
        assert json.loads((stage / "stage.json").read_text())["complete"], stage
    assert results["synthesis"]["n_images"] == 3
    pipe = load_pipeline(cfg, finetuned=True)
    assert pipe.ldm.scheduler.config.prediction_type == "v_prediction"
    assert pipe.tuned.scheduler.config.prediction_type == "v_prediction"


def _synthetic(cfg) -> dict[str, np.ndarray]:
    root = Path(cfg.run_dir) / "05_synthesis" / "dataset"
    return {p.stem: np.asarray(Image.open(p)) for p in sorted((root / "images").glob("*.png"))}


def test_synthetic_images_are_images_not_noise(run):
    cfg, _, _ = run
    images = _synthetic(cfg)
    assert sorted(images) == ["syn-00000", "syn-00001", "syn-00002"]
    stack = np.stack(list(images.values())).astype(np.float32)
    assert stack.shape == (3, 16, 16, 3) and np.isfinite(stack).all()
    assert all(im.std() > 1.0 for im in stack)          # not a constant (e.g. NaN-to-black) image
    assert np.abs(stack[0] - stack[1]).mean() > 1.0     # the seeds matter
    masks = Path(cfg.run_dir) / "05_synthesis" / "dataset" / "masks"
    assert sorted(p.stem for p in masks.glob("*.png")) == sorted(images)


def _diffusers(ldm, seed: int, prediction_type=None) -> np.ndarray:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    kw = {} if prediction_type is None else {"prediction_type": prediction_type}
    pipe = StableDiffusionPipeline(
        vae=ldm.vae, unet=ldm.unet, text_encoder=ldm.text_encoder, tokenizer=ldm.tokenizer,
        scheduler=DDIMScheduler.from_config(ldm.scheduler.config, **kw), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(["a photo of a shape"], negative_prompt=["a photo of a background"],
                   height=ldm.resolution, width=ldm.resolution, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, eta=0.0, latents=synthesis.initial_latents(ldm, [seed]),
                   output_type="np").images
    return (np.asarray(out[0], np.float32) * 255).round()


def test_stage05_samples_with_v(run):
    """syn-00000 of stage 05 is diffusers' v-prediction CFG sample of m' at the same seed; read as
    ε the same model gives another image."""
    cfg, _, _ = run
    assert cfg.background_prompt == "a photo of a background"
    tuned = load_pipeline(cfg, finetuned=True).tuned
    seed = seeds.derive_seed(cfg.seed, "05-synthesis", "syn-00000")
    ours = _synthetic(cfg)["syn-00000"].astype(np.float32)
    as_v = _diffusers(tuned, seed)
    as_eps = _diffusers(tuned, seed, prediction_type="epsilon")
    assert np.abs(ours - as_v).max() <= 2  # PNG rounding and batch numerics
    assert np.abs(ours - as_eps).max() > 10
