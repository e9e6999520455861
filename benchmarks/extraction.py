"""Stage-01 extraction cost: our batched cross-attention capture against a bare UNet forward and
against the official structure (one UNet call per noise level, all token columns kept).

    python benchmarks/extraction.py [--model PATH] [--repeats N] [--json OUT] [--threads 1]
                                    [--toy-levels 40] [--sd-levels 8] [--sd-size 16]
                                    [--sd-repeats 3] [--skip-toy] [--skip-sd]

For one image and the same noise levels / noisy latents, it times (median of --repeats):

  capture     `fgbg_utils.core.attention.attention_maps`: all levels in ONE batched UNet call, capture
              processors on the attn2 layers only (object-token columns, head mean, fp32);
  bare        the same batched UNet call with the stock processors and no capture (the floor);
  sequential  the official structure: one UNet call per noise level, a processor on every attn2
              layer that materialises the softmax over ALL keys (baddbmm + softmax, as diffusers'
              AttnProcessor), averages heads and appends the (pixels x 77) map to a Python list;
              everything is upsampled to the latent grid at the end and the token column taken.

Two layouts: (i) the toy LDM (`--model`, default models/toy-ldm, else a freshly built random one
at 64 px) and (ii) an SD-1.5-shaped UNet with random weights (320/640/1280/1280, 2 layers per block,
16 cross-attention layers, 768-d context) at a reduced resolution (--sd-size latent, 16 = 128 px),
with a random (1, 77, 768) text embedding and token position 5. It prints a markdown table;
"kept" is the bytes of maps the method holds for the image (not a process-memory measurement), and
"max |dM|" checks that capture and sequential give the same mean map.

GPU mode, one command (random weights, nothing downloaded):

    python benchmarks/extraction.py --gpu [--json gpu.json] [--images 32] [--levels 40]
                                    [--dtype bfloat16] [--batch-rows auto] [--size 512]

SD-1.5-shaped UNet (UNet2DConditionModel with SD 1.5's config) at --size px (512: 64x64 latent),
T0 = --levels noise levels, --dtype weights. It reports images/s of the capture over --images
images, its ratio to bare batched UNet forwards of the same rows, the speed-up over the official
per-step structure (one UNet call per noise level, batch 3, all 77 token columns kept), the peak
`torch.cuda.max_memory_allocated` of the capture, and the max |dM| between the two maps. On the CPU
(`--device cpu --size 64 --images 2 --levels 2 --channel-divisor 16`) the same code runs as a smoke
test (tests/test_gpu_path.py).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fgbg_utils.io import atomic_write_json
from fgbg_utils.core import attention, models


# ----------------------------------------------------------------------------- official structure
class KeepAllProcessor:
    """Cross-attention the way the official code ran it: the full probability tensor is
    materialised, heads are averaged and the (rows, pixels, keys) map is appended to a list."""

    def __init__(self, sink: list):
        self.sink = sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        b = hidden_states.shape[0]
        ctx = encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(ctx))
        v = attn.head_to_batch_dim(attn.to_v(ctx))
        probs = attn.get_attention_scores(q, k, attention_mask)  # (b*heads, pixels, keys)
        self.sink.append(probs.view(b, attn.heads, *probs.shape[1:]).mean(1))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def _install(unet, make):
    """Processor per attn2 layer from `make()`; others unchanged. Returns the originals."""
    original = dict(unet.attn_processors)
    unet.set_attn_processor({n: (make() if n.endswith("attn2.processor") else p)
                             for n, p in original.items()})
    return original


@torch.no_grad()
def sequential_official(unet, zt, ts, emb, tokens, latent):
    """One UNet call per level; keep all 77 columns of every attn2 layer; upsample at the end."""
    sink: list[torch.Tensor] = []
    original = _install(unet, lambda: KeepAllProcessor(sink))
    try:
        for k in range(len(ts)):
            unet(zt[k:k + 1], ts[k:k + 1], encoder_hidden_states=emb)
    finally:
        unet.set_attn_processor(original)
    raw_bytes = sum(m.numel() * m.element_size() for m in sink)
    ups = []
    for m in sink:  # (1, pixels, keys) -> (keys, L, L), nearest
        r = math.isqrt(m.shape[1])
        g = m[0].T.reshape(-1, r, r)
        f = latent // r
        ups.append(g.repeat_interleave(f, -2).repeat_interleave(f, -1))
    full = torch.stack(ups).view(len(ts), -1, *ups[0].shape)  # (T, layers, keys, L, L)
    up_bytes = full.numel() * full.element_size()
    mhat = full[:, :, tokens].mean((0, 1)).sum(0)
    return mhat, raw_bytes + up_bytes


@torch.no_grad()
def bare_forward(unet, zt, ts, emb):
    unet(zt, ts, encoder_hidden_states=emb.expand(len(ts), -1, -1))


def ours(unet, scheduler, z0, emb, tokens, ts, noise):
    full = attention.attention_maps(unet, scheduler, z0, emb, tokens, ts.numpy(), noise,
                                    batch_rows=len(ts))
    mhat = attention.reduce_maps(full, len(ts))["mhat_raw"][0]
    return mhat, full.numel() * full.element_size()


@torch.no_grad()
def sequential_official_batch(unet, zt, ts, emb, tokens, latent):
    """The official structure for a batch of n images: one UNet call per level (rows = the n
    images), all key columns of every attn2 layer kept; returns M̂ (n, L, L) float32."""
    sink: list[torch.Tensor] = []
    n = zt.shape[0]
    original = _install(unet, lambda: KeepAllProcessor(sink))
    try:
        for k in range(len(ts)):
            unet(zt[:, k], ts[k:k + 1].expand(n), encoder_hidden_states=emb.expand(n, -1, -1))
    finally:
        unet.set_attn_processor(original)
    acc = None
    for m in sink:  # (n, pixels, keys) -> (n, keys, L, L), nearest
        r = math.isqrt(m.shape[1])
        f = latent // r
        g = m.transpose(1, 2).reshape(n, -1, r, r).repeat_interleave(f, -2).repeat_interleave(f, -1)
        part = g[:, tokens].float().sum(1)
        acc = part if acc is None else acc + part
    return acc / len(sink)


# ----------------------------------------------------------------------------- one layout
def bench(name, unet, scheduler, emb, levels, tokens, repeats, seed=0):
    unet.eval().requires_grad_(False)
    latent = int(unet.config.sample_size)
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn((1, 4, latent, latent), generator=g)
    ts = torch.as_tensor(models.lowest_timesteps(scheduler, levels).astype(np.int64))
    noise = torch.randn((1, levels, 4, latent, latent), generator=g)
    zt = scheduler.add_noise(z0.expand(levels, -1, -1, -1), noise[0], ts)
    n_cross = sum(n.endswith("attn2.processor") for n in unet.attn_processors)

    bare_forward(unet, zt[:1], ts[:1], emb)  # warm-up (allocator, kernels)
    times = {"bare": [], "capture": [], "sequential": []}
    for _ in range(repeats):  # interleaved, so drifts of a shared machine hit all three alike
        t = time.perf_counter()
        bare_forward(unet, zt, ts, emb)
        times["bare"].append(time.perf_counter() - t)
        t = time.perf_counter()
        m_ours, kept_ours = ours(unet, scheduler, z0, emb, tokens, ts, noise)
        times["capture"].append(time.perf_counter() - t)
        t = time.perf_counter()
        m_seq, kept_seq = sequential_official(unet, zt, ts, emb, tokens, latent)
        times["sequential"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name, "latent": latent, "levels": levels, "cross_attention_layers": n_cross,
        "tokens": tokens, "repeats": repeats, "threads": torch.get_num_threads(),
        "median_s": med, "all_s": times,
        "capture_over_bare": med["capture"] / med["bare"],
        "sequential_over_capture": med["sequential"] / med["capture"],
        "kept_bytes": {"capture": kept_ours, "sequential": kept_seq},
        "max_abs_diff_mhat": float((m_ours - m_seq).abs().max()),
        "mhat_scale": float(m_ours.abs().max()),
    }


def toy_layout(model_path: str | None):
    """(name, unet, scheduler, emb) for the toy layout."""
    path = Path(model_path) if model_path else ROOT / "models" / "toy-ldm"
    if path.exists():
        ldm = models.load_ldm(str(path), device="cpu")
        return f"toy ({path.name})", ldm.unet, ldm.scheduler, models.encode_prompt(ldm, "a photo of a shape")
    if model_path:
        raise SystemExit(f"--model {model_path} does not exist")
    from fgbg_utils.data import toy
    _, unet, text_encoder, tokenizer, scheduler = toy.build_models(image_size=64, seed=0)
    ids = tokenizer(["a photo of a shape"], padding="max_length", max_length=toy.MAX_LENGTH,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        emb = text_encoder.eval()(ids)[0]
    return "toy (random, 64 px)", unet, scheduler, emb


def sd15_unet(size: int, divisor: int = 1, device="cpu"):
    """UNet2DConditionModel with SD 1.5's config (random weights) at latent `size`, built on
    `device`. `divisor` > 1 shrinks the channels (smoke tests only)."""
    from diffusers import UNet2DConditionModel

    ch = tuple(c // divisor for c in (320, 640, 1280, 1280))
    with torch.device(device):
        return UNet2DConditionModel(
            sample_size=size, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=ch, cross_attention_dim=768,
            attention_head_dim=math.gcd(8, ch[0]), norm_num_groups=math.gcd(32, ch[0]),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def sd_layout(size: int, seed: int = 0):
    from diffusers import DDIMScheduler
    torch.manual_seed(seed)
    unet = sd15_unet(size)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
                              set_alpha_to_one=False)
    emb = torch.randn((1, 77, 768), generator=torch.Generator().manual_seed(seed))
    return f"SD-1.5-shaped (random, {size * 8} px)", unet, scheduler, emb


# ----------------------------------------------------------------------------- GPU mode
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(dev, fn, repeats: int):
    """(median seconds, last result) of `repeats` calls after one warm-up call."""
    out = fn()
    times = []
    for _ in range(repeats):
        _sync(dev)
        t = time.perf_counter()
        out = fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def bench_gpu(args) -> dict:
    """Capture vs bare batched forwards vs the official per-step structure on an SD-1.5-shaped UNet."""
    from diffusers import DDIMScheduler

    dev = models.pick_device(args.device)
    dtype = getattr(torch, args.dtype)
    latent = args.size // 8
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    unet = sd15_unet(latent, args.channel_divisor, dev).eval().requires_grad_(False)
    if dtype != torch.float32:
        unet.to(dtype)
    build_s = time.perf_counter() - t0
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
                          set_alpha_to_one=False)
    g = torch.Generator().manual_seed(args.seed)
    n, T, tokens = args.images, args.levels, [5]
    z0 = torch.randn((n, 4, latent, latent), generator=g)
    noise = torch.randn((n, T, 4, latent, latent), generator=g)
    emb = torch.randn((1, 77, 768), generator=g).to(dev, dtype)
    ts = torch.as_tensor(models.lowest_timesteps(sched, T).astype(np.int64))
    rows = attention.resolve_batch_rows(int(args.batch_rows) if args.batch_rows != "auto" else "auto",
                                        unet, latent)
    zt = torch.stack([sched.add_noise(z0[b:b + 1].expand(T, -1, -1, -1), noise[b], ts) for b in range(n)])
    flat_zt = zt.reshape(n * T, *zt.shape[2:]).to(dev, dtype)
    flat_t = ts.repeat(n).to(dev)

    def capture():
        return attention.attention_maps(unet, sched, z0, emb, tokens, ts.numpy(), noise, rows)

    def bare():
        for s in range(0, n * T, rows):
            unet(flat_zt[s:s + rows], flat_t[s:s + rows],
                 encoder_hidden_states=emb.expand(len(flat_t[s:s + rows]), -1, -1))

    n_off = min(3, n)
    zt_off = zt[:n_off].to(dev, dtype)

    def official():
        return sequential_official_batch(unet, zt_off, ts.to(dev), emb, tokens, latent)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with torch.no_grad():
        t_cap, full = _timed(dev, capture, args.repeats)
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        t_bare, _ = _timed(dev, bare, args.repeats)
        t_off, m_off = _timed(dev, official, args.repeats)
    mhat = attention.reduce_maps(full, T)["mhat_raw"][:n_off]
    ips = n / t_cap
    ips_off = n_off / t_off
    return {
        "mode": "gpu", "device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "torch": torch.__version__, "dtype": args.dtype, "size": args.size, "latent": latent,
        "channel_divisor": args.channel_divisor, "images": n, "levels": T, "batch_rows": rows,
        "cross_attention_layers": sum(k.endswith("attn2.processor") for k in unet.attn_processors),
        "repeats": args.repeats, "build_s": build_s,
        "capture_s": t_cap, "bare_s": t_bare, "official_s": t_off, "official_batch": n_off,
        "images_per_s": ips, "bare_images_per_s": n / t_bare, "official_images_per_s": ips_off,
        "capture_over_bare": t_cap / t_bare, "speedup_over_sequential": ips / ips_off,
        "max_memory_allocated_bytes": peak,
        "max_abs_diff_mhat": float((mhat - m_off.float().cpu()).abs().max()),
        "mhat_scale": float(mhat.abs().max()),
    }


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def table(results) -> str:
    head = ("| model | latent | attn2 layers | levels | bare (s) | capture (s) | sequential (s) "
            "| capture/bare | sequential/capture | kept: capture | kept: sequential | max abs dM |")
    rows = [head, "|" + "---|" * 12]
    for r in results:
        m = r["median_s"]
        rows.append(f"| {r['model']} | {r['latent']}x{r['latent']} | {r['cross_attention_layers']} "
                    f"| {r['levels']} | {m['bare']:.3f} | {m['capture']:.3f} | {m['sequential']:.3f} "
                    f"| {r['capture_over_bare']:.2f} | {r['sequential_over_capture']:.2f} "
                    f"| {_mb(r['kept_bytes']['capture'])} | {_mb(r['kept_bytes']['sequential'])} "
                    f"| {r['max_abs_diff_mhat']:.1e} |")
    return "\n".join(rows)


def json_table(r: dict) -> str:
    mem = r["max_memory_allocated_bytes"]
    return "\n".join([
        (f"{r['device']} {r['gpu'] or ''} {r['dtype']}, {r['size']} px, T0={r['levels']}, "
         f"{r['images']} images, {r['batch_rows']} rows per UNet call"),
        f"capture: {r['images_per_s']:.2f} images/s ({r['capture_s']:.3f} s)",
        (f"bare batched UNet forwards: {r['bare_images_per_s']:.2f} images/s -> capture/bare "
         f"{r['capture_over_bare']:.2f}"),
        (f"official per-step (batch {r['official_batch']}, all 77 tokens): "
         f"{r['official_images_per_s']:.2f} images/s -> speed-up {r['speedup_over_sequential']:.1f}x"),
        (f"max_memory_allocated: {'n/a' if mem is None else f'{mem / 2**30:.2f} GiB'}; "
         f"max |dM| {r['max_abs_diff_mhat']:.1e} (scale {r['mhat_scale']:.1e})")])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="toy model folder (default models/toy-ldm, else a random one)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per layout (median)")
    ap.add_argument("--json", help="write all numbers to this JSON file")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--toy-levels", type=int, default=40, help="noise levels T0 for the toy layout")
    ap.add_argument("--sd-levels", type=int, default=8, help="noise levels T0 for the SD layout")
    ap.add_argument("--sd-size", type=int, default=16, help="SD latent size (16 = 128 px)")
    ap.add_argument("--sd-repeats", type=int, default=3,
                    help="repeats for the SD layout (~20 s each on 1 thread at the defaults)")
    ap.add_argument("--skip-toy", action="store_true")
    ap.add_argument("--skip-sd", action="store_true")
    gpu = ap.add_argument_group("GPU mode (--gpu)")
    gpu.add_argument("--gpu", action="store_true", help="SD-1.5-shaped UNet at --size px (see above)")
    gpu.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test)")
    gpu.add_argument("--size", type=int, default=512, help="image size in px (latent = size / 8)")
    gpu.add_argument("--images", type=int, default=32, help="images per timed capture")
    gpu.add_argument("--levels", type=int, default=40, help="noise levels T0")
    gpu.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    gpu.add_argument("--batch-rows", default="auto", help="UNet rows per call, or auto")
    gpu.add_argument("--channel-divisor", type=int, default=1, help="shrink channels (smoke tests)")
    gpu.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.gpu:
        res = bench_gpu(args)
        print(json_table(res))
        if args.json:
            atomic_write_json(args.json, res)
        return res
    results = []
    if not args.skip_toy:
        name, unet, sched, emb = toy_layout(args.model)
        results.append(bench(name, unet, sched, emb, args.toy_levels, [5], args.repeats))
        print(f"done: {name}", file=sys.stderr)
    if not args.skip_sd:
        t = time.perf_counter()
        name, unet, sched, emb = sd_layout(args.sd_size)
        build = time.perf_counter() - t
        results.append(bench(name, unet, sched, emb, args.sd_levels, [5], args.sd_repeats))
        results[-1]["build_s"] = build
        print(f"done: {name} (built in {build:.1f} s)", file=sys.stderr)
    print(f"\n{torch.get_num_threads()} thread(s), torch {torch.__version__}, CPU\n")
    print(table(results))
    if args.json:
        atomic_write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
