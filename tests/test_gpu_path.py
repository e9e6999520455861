"""The GPU fast path of core, checked on the CPU: one half dtype for UNet, VAE and text encoder
(float16 falls back to float32 on the CPU), float32 captured probabilities, SDPA self-attention
during capture, batched VAE encoding, `batch_rows="auto"` and halving the rows on out-of-memory."""
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from fgbg_utils.core import attention, models
from fgbg_utils.core.attention import CrossAttentionCapture
from fgbg_utils.core.pipeline import FgBgPipeline

torch.set_num_threads(1)
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny-sd"


@pytest.fixture(scope="module")
def ldm():
    return models.load_ldm(str(FIXTURE), device="cpu")


def _inputs(ldm, B=2, T=4):
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn((B, 4, 8, 8), generator=g)
    noise = torch.randn((B, T, 4, 8, 8), generator=g)
    ts = models.lowest_timesteps(ldm.scheduler, T)
    return z0, models.encode_prompt(ldm, "a photo of a bird"), [5], ts, noise


# ----------------------------------------------------------------------------- dtypes
def test_half_dtype_applies_to_unet_vae_and_text_encoder():
    with pytest.warns(UserWarning, match="float16 on the CPU"):
        m16 = models.load_ldm(str(FIXTURE), device="cpu", dtype="float16")
    assert {m16.unet.dtype, m16.vae.dtype, m16.text_encoder.dtype} == {torch.float32}
    bf = models.load_ldm(str(FIXTURE), device="cpu", dtype="bfloat16")
    assert {bf.unet.dtype, bf.vae.dtype, bf.text_encoder.dtype} == {torch.bfloat16}
    with pytest.raises(models.ModelError, match="dtype"):
        models.load_ldm(str(FIXTURE), device="cpu", dtype="float64")
    assert models.resolve_dtypes("float16", torch.device("cuda")) == (torch.float16, torch.float16)


def test_bfloat16_pipeline_runs_and_keeps_fp32_maps(ldm):
    """The whole method in bfloat16 (diffusers' inpaint pipeline needs one dtype throughout):
    maps are float32 and close to the float32 model's."""
    bf = FgBgPipeline.from_pretrained(str(FIXTURE), device="cpu", dtype="bfloat16")
    bf = bf.with_finetuned(bf.ldm)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2)]
    maps = bf.attention_maps(imgs, "bird", T0=3)
    ref = FgBgPipeline(ldm).attention_maps(imgs, "bird", T0=3)
    assert maps.mhat_raw.dtype == np.float32
    assert np.corrcoef(maps.mhat_raw.ravel(), ref.mhat_raw.ravel())[0, 1] > 0.95
    out = bf.refine(imgs, bf.preliminary_masks(maps), steps=2)
    assert out.backgrounds.dtype == np.float32 and np.isfinite(out.backgrounds).all()


def test_captured_probabilities_are_fp32_in_half():
    bf = models.load_ldm(str(FIXTURE), device="cpu", dtype="bfloat16")
    z0, emb, tok, ts, noise = _inputs(bf)
    full = attention.attention_maps(bf.unet, bf.scheduler, z0, emb, tok, ts, noise)
    assert full.dtype == torch.float32


# ----------------------------------------------------------------------------- SDPA
def test_self_attention_stays_on_sdpa_during_capture(ldm):
    seen = []
    hook = ldm.unet.register_forward_pre_hook(
        lambda mod, args: seen.append({n: type(p) for n, p in mod.attn_processors.items()}))
    try:
        attention.attention_maps(ldm.unet, ldm.scheduler, *_inputs(ldm)[:1], *_inputs(ldm)[1:])
    finally:
        hook.remove()
    assert seen
    for procs in seen:
        attn1 = [t for n, t in procs.items() if n.endswith("attn1.processor")]
        attn2 = [t for n, t in procs.items() if n.endswith("attn2.processor")]
        assert attn1 and all(t is AttnProcessor2_0 for t in attn1)
        assert attn2 and all(t is CrossAttentionCapture for t in attn2)


# ----------------------------------------------------------------------------- VAE batches
def test_encode_images_in_batches(ldm, monkeypatch):
    x = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (5, 3, 16, 16)).astype(np.float32))
    whole = models.encode_images(ldm, x, batch_size=8)
    sizes = []
    real = ldm.vae.encode
    monkeypatch.setattr(ldm.vae, "encode", lambda t: (sizes.append(len(t)), real(t))[1])
    parts = models.encode_images(ldm, x, batch_size=2)
    assert sizes == [2, 2, 1]
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- batch_rows
def test_auto_batch_rows():
    fake = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16,
                                 config=types.SimpleNamespace(block_out_channels=[320, 640, 1280, 1280]))
    per_row = attention.row_bytes(fake, 64)
    assert 100e6 < per_row < 600e6  # SD 1.5, 64x64 latent, bf16
    assert attention.auto_batch_rows(fake, 64, free_bytes=int(10 * per_row / 0.7) + 1) == 10
    assert attention.auto_batch_rows(fake, 64, free_bytes=0) == 1
    assert attention.auto_batch_rows(fake, 64, free_bytes=10**15) == attention.MAX_AUTO_ROWS
    cpu = types.SimpleNamespace(device=torch.device("cpu"))
    assert attention.resolve_batch_rows("auto", cpu, 8) == attention.CPU_BATCH_ROWS
    for bad in (0, -1, 2.5, "many", True):
        with pytest.raises(ValueError, match="batch_rows"):
            attention.resolve_batch_rows(bad, cpu, 8)


def test_auto_batch_rows_reads_free_gpu_memory(monkeypatch):
    fake = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float16,
                                 config=types.SimpleNamespace(block_out_channels=[320]))
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (asked.append(d), (2**34, 2**35))[1])
    rows = attention.auto_batch_rows(fake, 64)
    assert asked == [torch.device("cuda", 0)]
    assert rows == int(0.7 * 2**34 // attention.row_bytes(fake, 64))


class OOMUNet:
    """The real UNet, except that a call with more than `limit` rows raises out-of-memory."""

    def __init__(self, unet, limit):
        self.unet, self.limit, self.calls = unet, limit, []

    def __getattr__(self, name):
        return getattr(self.unet, name)

    def __call__(self, x, t, encoder_hidden_states):
        self.calls.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states)


def test_out_of_memory_halves_rows_and_retries(ldm):
    z0, emb, tok, ts, noise = _inputs(ldm, B=3, T=4)  # 12 rows
    fake = OOMUNet(ldm.unet, limit=3)
    with pytest.warns(UserWarning, match="out of memory"):
        got = attention.attention_maps(fake, ldm.scheduler, z0, emb, tok, ts, noise, batch_rows=16)
    assert fake.calls == [12, 6, 3, 3, 3, 3]
    ref = attention.attention_maps(ldm.unet, ldm.scheduler, z0, emb, tok, ts, noise, batch_rows=3)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    assert all(isinstance(p, AttnProcessor2_0) or "attn2" not in n
               for n, p in ldm.unet.attn_processors.items())  # processors restored
    assert not any(isinstance(p, CrossAttentionCapture) for p in ldm.unet.attn_processors.values())


def test_out_of_memory_at_one_row_is_raised(ldm):
    z0, emb, tok, ts, noise = _inputs(ldm, B=1, T=2)
    fake = OOMUNet(ldm.unet, limit=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(torch.OutOfMemoryError):
            attention.attention_maps(fake, ldm.scheduler, z0, emb, tok, ts, noise, batch_rows=4)
    assert fake.calls == [2, 1]
    assert not any(isinstance(p, CrossAttentionCapture) for p in ldm.unet.attn_processors.values())


# ----------------------------------------------------------------------------- benchmark
def test_gpu_benchmark_mode_runs_on_cpu_tiny(tmp_path):
    import importlib.util
    import json

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_extraction", root / "benchmarks" / "extraction.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu.json"
    res = bench.main(["--gpu", "--device", "cpu", "--size", "64", "--images", "2", "--levels", "2",
                      "--channel-divisor", "16", "--dtype", "float32", "--repeats", "1",
                      "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["images_per_s"] > 0 and saved["latent"] == 8 and saved["levels"] == 2
    for k in ("capture_over_bare", "speedup_over_sequential", "max_memory_allocated_bytes",
              "max_abs_diff_mhat"):
        assert k in saved
    assert saved["max_abs_diff_mhat"] < 1e-3 * max(1.0, saved["mhat_scale"])
    assert res == saved
