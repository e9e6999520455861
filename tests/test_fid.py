"""FID (Table 3, Fig. 8): torchmetrics' FrechetInceptionDistance with an injected feature module
equals a hand computation; a missing Inception file is a clear error; a TorchScript network is
called as NVIDIA's Inception is; the shipped toy feature network names the toy world's classes; a
set against itself is ~0 and against a shifted set is not; stage 05 reports fid per s and the
floor."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fgbg_utils import load_params
from fgbg_utils.core.fid import (INCEPTION_URL, FeatureNetworkError, TorchScriptInception,
                                 frechet_distance, load_features)
from fgbg_utils.data import toy
from fgbg_utils.runs.params import PROJECT_ROOT
from fgbg_utils.runs.run_folder import StageError

from tests.fixtures.tiny import TINY, TOY

TOY_FEATURES = PROJECT_ROOT / "models" / "toy-features"


class PooledColours(nn.Module):
    """A fixed feature module: 2x2 average-pooled colours through a seeded linear map (4-d)."""

    num_features = 4

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.randn(12, 4, generator=g)

    def forward(self, x):
        pooled = nn.functional.adaptive_avg_pool2d(x.float() / 255, 2).flatten(1)
        return pooled @ self.weight


def _images(n, seed, shift=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, (n, 1, 1, 3)) + rng.integers(0, 40, (n, 8, 8, 3))
    return list(np.clip(base + shift, 0, 255).astype(np.uint8))


def test_fid_equals_a_hand_computation():
    from scipy import linalg

    real, fake = _images(20, 1), _images(15, 2, shift=30)
    net = PooledColours()
    feats = lambda ims: net(torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2)).double().numpy()  # noqa: E731
    a, b = feats(real), feats(fake)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real)
    got = frechet_distance(real, fake, net, size=8, batch_size=6)  # batches do not change it
    assert expected > 0.1
    assert got == pytest.approx(expected, rel=1e-4)


def test_missing_inception_file_is_a_clear_error(tmp_path):
    with pytest.raises(FeatureNetworkError) as e:
        load_features(tmp_path / "inception-2015-12-05.pt")
    msg = str(e.value)
    assert "synthesis.fid_features" in msg and INCEPTION_URL in msg and "does not exist" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatureNetworkError, match="config.json"):
        load_features(tmp_path / "empty")
    (tmp_path / "junk.pt").write_bytes(b"not a network")
    with pytest.raises(FeatureNetworkError, match="not a TorchScript"):
        load_features(tmp_path / "junk.pt")


def test_stage_05_refuses_a_missing_feature_network_before_any_work(tmp_path):
    from fgbg_utils.stages import synthesis

    missing = tmp_path / "inception-2015-12-05.pt"
    cfg = load_params(TOY, {**TINY, "synthesis.fid_features": str(missing)}, run_dir=str(tmp_path / "run"))
    with pytest.raises(StageError, match="synthesis.fid_features"):
        synthesis.run(cfg, progress=False)
    assert not (tmp_path / "run" / "05_synthesis").exists()


class _FakeInception(nn.Module):
    """NVIDIA's calling convention: float [0, 255] NCHW in, `return_features=True` gives the pool."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        feats = torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, 0].mean((1, 2))], 1)
        return feats if return_features else feats.sum(1, keepdim=True)


def test_torchscript_feature_network_is_called_like_nvidias_inception(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(_FakeInception()), str(path))
    net = load_features(path)
    assert isinstance(net, TorchScriptInception)
    x = torch.from_numpy(np.stack(_images(3, 0))).permute(0, 3, 1, 2)
    out = net(x)
    assert out.shape == (3, 3)
    assert torch.allclose(out[:, 0], x.float().mean((1, 2, 3)))


def test_toy_feature_network_separates_the_toy_classes():
    from fgbg_utils.training.feature_net import accuracy, labels_of, load_feature_net

    info = json.loads((TOY_FEATURES / "training_info.json").read_text())
    assert info["steps"] > 0 and info["seconds"] > 0
    assert set(info["heldout_accuracy"]) == {"kind", "colour", "background"}
    net = load_feature_net(TOY_FEATURES)
    images, _, _, metas = toy.generate_arrays(200, seed=2002, background_fraction=0.15)  # an unseen world
    acc = accuracy(net, images, labels_of(metas))
    assert acc["kind"] >= 0.85 and acc["colour"] >= 0.9 and acc["background"] >= 0.85, acc
    feats = net(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert feats.shape == (200, net.num_features) and torch.isfinite(feats).all()


def test_fid_of_a_set_with_itself_is_zero_and_of_a_shifted_set_is_not():
    net = load_features(TOY_FEATURES)
    images, _, _, _ = toy.generate_arrays(64, seed=2003)
    same = frechet_distance(list(images), list(images), net, size=64)
    darker = [np.clip(im.astype(int) - 60, 0, 255).astype(np.uint8) for im in images]
    shifted = frechet_distance(list(images), darker, net, size=64)
    other_world, _, _, _ = toy.generate_arrays(64, seed=2004)
    sampling = frechet_distance(list(images), list(other_world), net, size=64)
    assert abs(same) < 1e-3 * shifted
    assert shifted > 2 * sampling > 0  # a shift is far beyond two draws of the same world


def test_stage_05_reports_fid_per_scale_and_the_floor(tmp_path):
    from fgbg_utils.stages import attention_maps, binarization, finetuning, synthesis

    cfg = load_params(TOY, {**TINY, "dataset.n_train": 4, "synthesis.n_images": 4}, run_dir=str(tmp_path / "run"))
    for stage in (attention_maps, binarization, finetuning):
        stage.run(cfg, progress=False)
    s05 = synthesis.run(cfg, progress=False)
    own = cfg.synthesis.guidance
    assert set(s05["fid"]) == {f"{s:g}" for s in (1, 3, 7.5, own)}
    assert all(np.isfinite(v) and v >= 0 for v in s05["fid"].values())
    assert np.isfinite(s05["fid_floor"]) and s05["fid_seconds"] >= 0
    p = s05["fid_protocol"]
    assert (p["n_real"], p["n_generated_per_scale"], p["feature_dim"]) == (4, 4, 32)
    assert p["features"] == "models/toy-features" and p["warning"] is None
    root = Path(cfg.run_dir) / "05_synthesis" / "fid"
    assert sorted(f.name for f in root.iterdir()) == ["s_1", "s_3", "s_7.5"]  # the own s reuses D'
    assert all(len(list((root / d).glob("*.png"))) == 4 for d in ("s_1", "s_3", "s_7.5"))
    # the value is the core function on the stored images
    from fgbg_utils.data.datasets import load_image
    from fgbg_utils.stages.common import processed_records
    real = [load_image(r.image) for r in processed_records(cfg) if r.split == "train"]
    fake = [load_image(f) for f in sorted((root / "s_3").glob("*.png"))]
    again = frechet_distance(real, fake, load_features(TOY_FEATURES), 64)
    assert s05["fid"]["3"] == pytest.approx(again, abs=1e-4)
    # the views: the table beside the paper's 9.8 / 11.3 / 22.3 and the curve (Fig. 8)
    import matplotlib
    matplotlib.use("Agg")
    from fgbg_utils.views.evidence import fid_curve, fid_table
    text = fid_table(cfg.run_dir)
    assert f"| 3 | {s05['fid']['3']:.3f} | 11.3 |" in text and f"{s05['fid_floor']:.3f}" in text
    fig = fid_curve(s05)
    assert len(fig.axes) == 2 and len(fig.axes[0].lines[0].get_xdata()) == 4


def test_feature_net_training_is_reproducible_and_the_cli_runs_it(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from fgbg_utils.runs import cli
    from fgbg_utils.training import feature_net

    small = {"n_train": 48, "n_heldout": 16, "steps": 3, "batch_size": 8}
    infos = [feature_net.train_feature_net(tmp_path / k, small, log=lambda m: None) for k in "ab"]
    a, b = (load_file(str(tmp_path / k / "model.safetensors")) for k in "ab")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert infos[0]["recipe"]["steps"] == 3 and infos[0]["heldout_accuracy"] == infos[1]["heldout_accuracy"]
    assert feature_net.load_feature_net(tmp_path / "a").num_features == 32
    seen = {}
    monkeypatch.setattr(feature_net, "train_feature_net", lambda out, recipe: seen.update(out=out, recipe=recipe))
    assert cli.main(["train-toy", "--model", "features"]) == 0
    assert seen == {"out": "models/toy-features", "recipe": {"threads": 1}}


def test_the_own_scale_samples_its_own_images_when_d_prime_has_too_few(tmp_path):
    """synthesis.n_images below fid_images (0 here): the run's own s is sampled like every other s."""
    from fgbg_utils.stages import attention_maps, binarization, finetuning, synthesis

    cfg = load_params(TOY, {**TINY, "synthesis.n_images": 0, "synthesis.fid_scales": [3],
                            "segmentation.rows": ["unet_D_s"]}, run_dir=str(tmp_path / "run"))
    for stage in (attention_maps, binarization, finetuning):
        stage.run(cfg, progress=False)
    s05 = synthesis.run(cfg, progress=False)
    own = f"{cfg.synthesis.guidance:g}"
    root = Path(cfg.run_dir) / "05_synthesis" / "fid"
    assert s05["n_images"] == 0 and set(s05["fid"]) == {"3", own}
    assert sorted(f.name for f in root.iterdir()) == sorted(["s_3", f"s_{own}"])
    assert len(list((root / f"s_{own}").glob("*.png"))) == cfg.synthesis.fid_images
    assert s05["fid_protocol"]["own_scale_images"].startswith(f"fid/s_{own}/")
    assert all(np.isfinite(v) for v in s05["fid"].values())
