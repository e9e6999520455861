"""Single-file SD checkpoints (original LDM layout) loaded offline into the same `LDM` as a
diffusers folder: the tiny fixture converted by tests/fixtures/to_original_sd.py."""
import pathlib
import pickle
from pathlib import Path

import pytest
import torch

from fgbg_utils.core import models
from fgbg_utils.core.models import ModelError, load_ldm
from fgbg_utils.core.single_file import load_single_file
from tests.fixtures.to_original_sd import write_single_file

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny-sd"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    return {s: write_single_file(FIXTURE, d / f"tiny-sd{s}") for s in (".safetensors", ".ckpt")}


@pytest.fixture(scope="module")
def reference():
    return load_ldm(str(FIXTURE), device="cpu")


def _outputs(ldm):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    z = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        emb = models.encode_prompt(ldm, "a photo of a bird")
        eps = ldm.unet(z, torch.tensor([1, 501]), emb.expand(2, -1, -1)).sample
        lat = models.encode_images(ldm, x, "mode")
        img = ldm.vae.decode(lat / ldm.vae.config.scaling_factor).sample
    return emb, eps, lat, img


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_equals_the_diffusers_folder(files, reference, suffix):
    ldm = load_ldm(str(files[suffix]), device="cpu", config=str(FIXTURE))  # dispatch in load_ldm
    assert isinstance(ldm, models.LDM) and ldm.path == str(files[suffix])
    assert type(ldm.scheduler).__name__ == "DDIMScheduler"
    assert (ldm.resolution, ldm.latent_size, ldm.vae_factor) == (16, 8, 2)
    assert models.lowest_timesteps(ldm.scheduler, 3).tolist() == [1, 21, 41]
    assert ldm.tokenizer("a photo of a bird").input_ids == reference.tokenizer("a photo of a bird").input_ids
    for a, b in zip(_outputs(ldm), _outputs(reference)):
        assert a.shape == b.shape and torch.equal(a, b)
    assert not any(p.requires_grad for p in ldm.unet.parameters())


def test_weights_really_come_from_the_file(files, reference, tmp_path):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(files[".safetensors"]))
    key = "model.diffusion_model.out.2.bias"
    sd[key] = sd[key] + 1.0
    save_file(sd, str(tmp_path / "changed.safetensors"))
    ldm = load_single_file(tmp_path / "changed.safetensors", config=FIXTURE, device="cpu")
    assert torch.equal(ldm.unet.conv_out.bias, reference.unet.conv_out.bias + 1.0)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):  # unpickling would create the file
        return (pathlib.Path.touch, (pathlib.Path(self.target),))


def test_ckpt_with_pickled_code_is_refused_without_running_it(files, tmp_path):
    from safetensors.torch import load_file
    sentinel = tmp_path / "pwned"
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": load_file(str(files[".safetensors"])), "x": _Evil(sentinel)}, bad)
    with pytest.raises(ModelError, match=r"weights_only=True.*safetensors"):
        load_single_file(bad, config=FIXTURE, device="cpu")
    assert not sentinel.exists()
    with pytest.raises(pickle.UnpicklingError):  # the file really is malicious for a plain load
        torch.load(bad, weights_only=True)


def test_clear_errors(files, tmp_path):
    with pytest.raises(ModelError, match="set `model.config`"):
        load_single_file(files[".safetensors"], device="cpu")
    with pytest.raises(ModelError, match="`model.config`=.*model_index.json"):
        load_single_file(files[".safetensors"], config=tmp_path, device="cpu")
    with pytest.raises(ModelError, match="does not exist"):
        load_ldm(str(tmp_path / "missing.safetensors"), device="cpu", config=str(FIXTURE))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="could not be loaded"):
        load_single_file(tmp_path / "junk.safetensors", config=FIXTURE, device="cpu")


def test_config_defaults_to_the_files_folder(tmp_path):
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(FIXTURE, folder)
    f = write_single_file(folder, folder / "weights.safetensors")
    ldm = load_single_file(f, device="cpu")
    assert ldm.unet.config.sample_size == 8
