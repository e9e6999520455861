"""The real-SD code path of stages 01 and 02 on local fixtures, nothing downloaded: the tiny
SD-v1-shaped model (tests/fixtures/tiny-sd, R = 16 px, 8x8 latent), a tiny CUB-layout dataset and
a tiny folder-layout dataset, driven by the shipped params/cub.yaml and params/folder.yaml."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgbg_utils.stages import attention_maps as stage_attention, binarization as stage_binarization
from fgbg_utils.data.datasets import load_records
from fgbg_utils.runs.params import load_params
from fgbg_utils.runs.run_folder import StageError

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-sd"
LATENT = 8
METRIC_KEYS = ("n_images", "auc_roc", "acc", "iou", "miou", "iou_per_image", "dice_per_image")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import huggingface_hub.constants as hc  # read at import time: patch the constant too
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)


def _sample(rng, h, w):
    """A 'bird' (bright ellipse) on a textured background; its mask (soft edge like CUB's)."""
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
    d = ((yy - cy) / (0.3 * h)) ** 2 + ((xx - cx) / (0.3 * w)) ** 2
    bg = rng.uniform(20, 90, 3) + rng.normal(0, 10, (h, w, 3))
    img = np.where((d <= 1)[..., None], rng.uniform(170, 250, 3), bg)
    mask = np.where(d <= 0.8, 255, np.where(d <= 1.2, 128, 0)).astype(np.uint8)
    return np.clip(img, 0, 255).astype(np.uint8), mask


SIZES = [(24, 20), (20, 24), (24, 20)]  # (h, w): non-square, both orientations


def make_cub(root: Path) -> Path:
    rng = np.random.default_rng(0)
    lines, split = [], []
    n = 0
    for c, cls in enumerate(["001.Black_footed_Albatross", "002.Laysan_Albatross"]):
        for k, (h, w) in enumerate(SIZES):
            n += 1
            rel = f"{cls}/{cls[4:]}_{k:04d}_{100 + n}.jpg"
            img, mask = _sample(rng, h, w)
            for sub, arr, ext in (("images", img, ".jpg"), ("segmentations", mask, ".png")):
                p = (root / sub / rel).with_suffix(ext)
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(p)
            lines.append(f"{n} {rel}")
            split.append(f"{n} {0 if k == 2 else 1}")  # one test image per class
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "bounding_boxes.txt").write_text("".join(f"{i} 0 0 1 1\n" for i in range(1, n + 1)))
    return root


def make_folder(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate(SIZES * 2):
        img, mask = _sample(rng, h, w)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "images" / f"img{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"img{i:02d}.png")
    assert not (root / "split.csv").exists()
    return root


def _cfg(name: str, data_root: Path, tmp_path: Path, **extra) -> dict:
    params = ROOT / "params" / f"{name}.yaml"
    assert params.is_file(), f"{params} is missing"
    overrides = {"model.path": str(FIXTURE), "dataset.root": str(data_root), "T0": 3,
                 "attention.grid_steps": 50, "attention.sweep": False, "object": "bird",
                 "device": "cpu", "dtype": "float32", **extra}
    cfg = load_params(params, overrides=overrides, run_dir=str(tmp_path / "run"))
    assert cfg.dataset.kind == name  # the kind comes from the YAML
    return cfg


def _in_unit(x) -> bool:
    return isinstance(x, (int, float)) and 0.0 <= x <= 1.0


def _check_run(cfg: dict, n_images: int, n_eval: int):
    summary = stage_attention.run(cfg, progress=False)
    assert summary["n_images"] == summary["n_computed"] == n_images
    assert summary["latent_size"] == LATENT and summary["resolution"] == 16
    assert summary["vae_factor"] == 2 and len(summary["layers"]) == 4
    assert summary["token_positions"] == {"bird": [5]}
    assert summary["timesteps"] == [1, 21, 41]

    ids = summary["images"]
    records = {r.id: r for r in load_records(cfg.dataset.kind, cfg.dataset.root,
                                             seed=cfg.dataset.seed,
                                             test_fraction=cfg.dataset.test_fraction)}
    assert sorted(ids) == sorted(records)
    for image_id in ids:
        m = stage_attention.load_map(cfg, image_id)
        assert m["mhat"].shape == m["mhat_raw"].shape == (LATENT, LATENT)
        assert m["mhat"].dtype == np.float32
        assert m["timesteps"].tolist() == [1, 21, 41]
        assert "per_timestep" not in m  # sweep off
        frame = m["frame"]
        with Image.open(records[image_id].image) as im:
            assert (frame.orig_h, frame.orig_w) == (im.height, im.width)
        assert frame.size == 16 and max(frame.h, frame.w) == 16 and min(frame.h, frame.w) == 14
        valid = frame.valid(2)
        assert valid.sum() == 8 * 7
        assert m["mhat"][valid].min() == 0.0 and m["mhat"][valid].max() == 1.0
        assert (m["mhat"][~valid] == 0).all()

    result = stage_binarization.run(cfg, progress=False)
    for image_id in ids:
        mpre = stage_binarization.load_mpre(cfg, image_id)
        assert mpre.shape == (LATENT, LATENT) and mpre.dtype == bool
        assert not mpre[~stage_attention.load_map(cfg, image_id)["frame"].valid(2)].any()

    path = Path(cfg.run_dir) / "metrics" / "02_binarization.json"
    metrics = json.loads(path.read_text())
    assert metrics == json.loads(json.dumps(result))
    assert metrics["n_images"] == n_eval
    for key in METRIC_KEYS[1:]:
        assert _in_unit(metrics[key]), (key, metrics[key])
    for name in ("all_foreground", "center_disc"):
        base = metrics["baselines"][name]
        assert base["n_images"] == n_eval
        for key in METRIC_KEYS[1:]:
            assert _in_unit(base[key]), (name, key, base[key])
    assert metrics["baselines"]["all_foreground"]["recall"] == 1.0

    # rerun: nothing is recomputed, outputs untouched
    stamps = {p: p.stat().st_mtime_ns for p in (Path(cfg.run_dir) / "01_attention_maps" / "maps").iterdir()}
    again = stage_attention.run(cfg, progress=False)
    assert again["n_computed"] == 0 and again["images"] == ids
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert stage_binarization.run(cfg, progress=False) == result
    return summary


def test_cub_layout(tmp_path):
    data = make_cub(tmp_path / "CUB_200_2011")
    cfg = _cfg("cub", data, tmp_path)
    summary = _check_run(cfg, n_images=6, n_eval=2)
    assert sorted(set(summary["splits"].values())) == ["test", "train"]
    assert summary["images"][0] == "001.Black_footed_Albatross__Black_footed_Albatross_0000_101"

    changed = _cfg("cub", data, tmp_path, T0=2)
    with pytest.raises(StageError, match="other parameters"):
        stage_attention.run(changed, progress=False)
    changed = _cfg("cub", data, tmp_path, **{"binarization.orphan_filter": False})
    with pytest.raises(StageError, match="other parameters"):
        stage_binarization.run(changed, progress=False)
    assert stage_attention.run(_cfg("cub", data, tmp_path, T0=2), force=True,
                               progress=False)["n_computed"] == 6


def test_folder_layout_without_split_csv(tmp_path):
    data = make_folder(tmp_path / "my_birds")
    cfg = _cfg("folder", data, tmp_path)
    summary = _check_run(cfg, n_images=6, n_eval=2)  # test_fraction 0.3 of 6 -> 2 test images
    assert sum(s == "test" for s in summary["splits"].values()) == 2

    changed = _cfg("folder", data, tmp_path, **{"attention.latent": "sample"})
    with pytest.raises(StageError, match="other parameters"):
        stage_attention.run(changed, progress=False)


def test_mask_of_other_size_than_image(tmp_path):
    data = make_folder(tmp_path / "my_birds")
    for p in (data / "masks").iterdir():
        with Image.open(p) as m:
            big = m.resize((m.width * 2, m.height * 2), Image.NEAREST)
        big.save(p)
    cfg = _cfg("folder", data, tmp_path)
    stage_attention.run(cfg, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = stage_binarization.run(cfg, progress=False)
    assert _in_unit(result["iou"])
    assert any("differs from" in str(w.message) for w in caught)
