"""Model families through the stages on a user's unlabelled photo folder (tests/fixtures/
make_photos.py: odd formats, one truncated file), with the tiny SDXL, SD3 and Flux pipelines
(tests/fixtures/make_tiny_families.py), params/folder.yaml and `--set model.path=...`:

* SDXL, SD3 and Flux through stages 01-06: noise levels are DDIM t for SDXL and flow-matching σ
  for SD3/Flux; SDXL's added conditions; SD3's and Flux's masked flow-matching loss, flow
  inpainting and velocity guidance (Flux's = true CFG); one M_pre, one refined mask and one
  label-free U-Net mask per readable photo, the last at the photo's own size.

The stages run in process (`python -m fgbg_utils stage NN`'s code path, without notebooks); the
`run` command with notebooks is measured in the README."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgbg_utils import load_params
from fgbg_utils.runs.params import PROJECT_ROOT
from fgbg_utils.stages import attention_maps as s01, binarization as s02, evaluation as s06
from fgbg_utils.stages import finetuning as s03, refinement as s04, synthesis as s05
from tests.fixtures.make_photos import make_photo_folder
from tests.fixtures.make_tiny_families import tiny_family

FOLDER = str(PROJECT_ROOT / "params" / "folder.yaml")
TINY = {"device": "cpu", "dtype": "float32", "T0": 5, "object": "bird",
        "attention": {"sweep": False, "batch_rows": 160},
        "finetune": {"max_train_steps": 2, "batch_size": 2, "eval_samples": 2, "eval_steps": 2},
        "refinement": {"steps": 3},
        "synthesis": {"n_images": 2, "steps": 3, "background_images": 1, "sweep_seeds": 1,
                      "sweep_scales": [0, 1]},
        "segmentation": {"size": 32, "base_width": 4, "depth": 2, "steps": 3, "batch_size": 2}}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-photos")
    info = make_photo_folder(root / "photos")
    return root / "photos", {k: v for k, v in info.items() if v["shape"] is not None}


def _cfg(family, photos, run_dir):
    return load_params(FOLDER, {**TINY, "model": {"path": str(tiny_family(family))},
                                "dataset": {"root": str(photos)}}, run_dir=str(run_dir))


def _masks(folder: Path) -> dict:
    return {p.stem: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_stages_01_to_06(family, photos, tmp_path):
    root, readable = photos
    cfg = _cfg(family, root, tmp_path / "run")
    for stage in (s01, s02, s03, s04, s05):
        stage.run(cfg, progress=False)
    s06.run(cfg, progress=False, log=lambda m: None)
    run = Path(cfg.run_dir)
    summary = json.loads((run / "01_attention_maps" / "summary.json").read_text())
    assert summary["family"] == family and summary["resolution"] == 16
    assert summary["n_images"] == len(readable) and len(summary["skipped_images"]) == 1
    levels = summary["timesteps"]
    if family == "sdxl":
        assert levels == [1, 21, 41, 61, 81]  # DDIM timesteps
    else:
        assert len(levels) == 5 and 0 < min(levels) < max(levels) < 1  # flow-matching σ
    kinds = {"sdxl": "up_blocks.", "sd3": "transformer_blocks.", "flux": "single_transformer_blocks."}
    assert any(n.startswith(kinds[family]) for n in summary["layers"])
    m_pre = _masks(run / "02_binarization" / "masks")
    assert set(m_pre) == set(readable) and all(m.shape == (8, 8) for m in m_pre.values())
    tuned = json.loads((run / "03_finetuning" / "fgbg_finetune.json").read_text())
    assert tuned["steps_done"] == 2
    refined = _masks(run / "04_refinement" / "refined")
    assert set(refined) == set(readable)
    synth = sorted((run / "05_synthesis" / "dataset" / "images").glob("*"))
    assert len(synth) == 2
    folders = [f for f in (run / "06_evaluation" / "masks").iterdir() if f.is_dir()]
    assert len(folders) == 1  # the best label-free U-Net row
    out = _masks(folders[0])
    assert set(out) == set(readable)  # one mask per readable photo, at its own size
    assert all(out[k].shape == tuple(readable[k]["shape"]) for k in out)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_lora_finetuning_of_a_transformer(family, photos, tmp_path):
    """`finetune.mode: lora` on SD3's and Flux's transformers: only the adapter trains (its B
    matrices leave zero), it is saved alone, and stage 04 refines with m' = m + adapter."""
    from safetensors.torch import load_file

    root, readable = photos
    cfg = load_params(FOLDER, {**TINY, "model": {"path": str(tiny_family(family))},
                               "dataset": {"root": str(root)},
                               "finetune": {**TINY["finetune"], "mode": "lora", "lora_rank": 2}},
                      run_dir=str(tmp_path / "run"))
    for stage in (s01, s02, s03, s04):
        stage.run(cfg, progress=False)
    out = Path(cfg.run_dir) / "03_finetuning"
    assert (out / "lora" / "adapter_config.json").exists() and not (out / "unet").exists()
    weights = load_file(out / "lora" / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in weights.items())
    assert set(_masks(Path(cfg.run_dir) / "04_refinement" / "refined")) == set(readable)
