"""The toy MMDiT (issue 17): a small SD3-shaped `SD3Transformer2DModel` trained with flow matching
on the toy world, shipped as the `StableDiffusion3Pipeline` folder models/toy-dit
(`python -m fgbg_utils train-toy --model dit`).

Lessons of the toy LDM kept (docs/method.md §8): one concept word per caption and a text layout in
which the object token carries the object. SD3's prompt encoding takes CLIP's ``hidden_states[-2]``,
so each of the two CLIP encoders has ONE layer and the sequence the transformer sees is their token
+ position embeddings (no mixing between words); their text projections are zero and frozen, so the
pooled vector is 0 and the object can only reach the image through the joint attention. No T5
encoder: the joint text sequence is the toy tokenizer's 12 tokens (core.families gives an SD3
folder without T5 no T5 tokens). The VAE is the toy LDM's (16x16x4 latents); patch size 2.

What makes it localise (README): the first recipe (patch size 1, CLIP's 0.02 word init, σ uniform,
2,000 steps) hardly used the text (the caption changed its loss by ≤ 2 %; the image content each
joint block writes into the text stream made every word the same vector) and its object-token map
was inverted (held-out AUC 0.22). The shipped recipe draws the word embeddings at std 1, samples σ
logit-normal as SD3 does (more steps where the caption matters) and uses 2x2 patches (4x cheaper
steps): held-out AUC 0.990, M_pre IoU 0.689.

Training: z_t = (1 - σ) z0 + σ ε, velocity target ε - z0, σ logit-normal (or uniform), timestep
1000 σ (as the SD3 pipeline calls it), EMA of the transformer; the steps are planned from the
measured step time; a resumable training state (safetensors) is written every few minutes, EMA
snapshots too, and the snapshot with the best M_pre IoU on the validation world (dataset.seed=100) ships.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fgbg_utils.data import toy
from fgbg_utils.io import atomic_write_json
from fgbg_utils.training.toy_training import clipped_step, cosine_lr, plan_steps, encode_latents, generate_corpus

DIT_ARCH = {"layers": 4, "heads": 4, "head_dim": 16, "text_hidden": 32, "patch_size": 1,
            "qk_norm": "rms_norm", "token_std": 0.02}
STATE = "train_state.safetensors"
STATE_META = "train_state.json"


# ----------------------------------------------------------------------------- models
def _clip(arch: dict):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    h = arch["text_hidden"]
    te = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(toy.VOCAB), hidden_size=h, intermediate_size=2 * h, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=toy.MAX_LENGTH, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, projection_dim=h))
    with torch.no_grad():
        te.text_projection.weight.zero_()  # pooled = 0: the object reaches the image by attention only
        if arch.get("token_std", 0.02) != 0.02:  # CLIP's own init is std 0.02
            te.text_model.embeddings.token_embedding.weight.normal_(0, arch["token_std"])
    te.text_projection.requires_grad_(False)
    return te


def build_dit_models(seed: int = 0, arch: dict | None = None, latent_size: int = 16):
    """Fresh (transformer, text_encoder, text_encoder_2, tokenizer, scheduler) of the toy MMDiT."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    a = {**DIT_ARCH, **(arch or {})}
    torch.manual_seed(seed)
    width = a["heads"] * a["head_dim"]
    transformer = SD3Transformer2DModel(
        sample_size=latent_size, patch_size=a["patch_size"], in_channels=4, out_channels=4,
        num_layers=a["layers"], attention_head_dim=a["head_dim"], num_attention_heads=a["heads"],
        joint_attention_dim=2 * a["text_hidden"], caption_projection_dim=width,
        pooled_projection_dim=2 * a["text_hidden"], pos_embed_max_size=latent_size // a["patch_size"],
        qk_norm=a["qk_norm"])
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return transformer, _clip(a), _clip(a), toy.build_tokenizer(), scheduler


def encode_ids(te1, te2, ids: torch.Tensor):
    """(emb, pooled) as StableDiffusion3Pipeline.encode_prompt builds them without T5:
    [CLIP-1 hidden_states[-2] ⊕ CLIP-2 hidden_states[-2]] and [pooled-1 ⊕ pooled-2]."""
    o1, o2 = te1(ids, output_hidden_states=True), te2(ids, output_hidden_states=True)
    emb = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1)
    return emb, torch.cat([o1.text_embeds, o2.text_embeds], -1)


def make_dit_pipeline(vae, transformer, te1, te2, tokenizer, scheduler):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=te1, tokenizer=tokenizer, text_encoder_2=te2,
                                    tokenizer_2=copy.deepcopy(tokenizer), text_encoder_3=None,
                                    tokenizer_3=None)


def load_toy_vae(folder: str | Path):
    """The toy LDM's VAE, with shift_factor 0 (SD3 pipelines read it)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(Path(folder) / "vae")
    vae.register_to_config(shift_factor=0.0)
    return vae.eval().requires_grad_(False)


def save_dit(out: Path, vae, transformer, te1, te2, tokenizer, scheduler, info: dict) -> None:
    """Atomic save_pretrained (safetensors) of the pipeline plus training_info.json."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    make_dit_pipeline(vae, transformer, te1, te2, tokenizer, scheduler).save_pretrained(
        tmp, safe_serialization=True)
    (tmp / "training_info.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


# ----------------------------------------------------------------------------- resumable state
def _save_state(work: Path, modules: dict, ema, opt, meta: dict, gen: torch.Generator) -> None:
    from safetensors.torch import save_file

    tensors = {f"{k}.{n}": p.detach().contiguous() for k, m in modules.items()
               for n, p in m.state_dict().items()}
    tensors.update({f"ema.{i}": p.contiguous() for i, p in enumerate(ema.shadow_params)})
    for i, st in enumerate(opt.state[p] for g in opt.param_groups for p in g["params"]):
        for key, v in st.items():
            tensors[f"opt.{i}.{key}"] = torch.as_tensor(v).contiguous()
    tensors["rng"] = gen.get_state()
    save_file(tensors, str(work / (STATE + ".tmp")))
    (work / (STATE + ".tmp")).replace(work / STATE)
    atomic_write_json(work / STATE_META, meta)


def _load_state(work: Path, modules: dict, ema, opt, gen: torch.Generator) -> dict | None:
    from safetensors.torch import load_file

    if not (work / STATE).is_file() or not (work / STATE_META).is_file():
        return None
    t = load_file(str(work / STATE))
    for k, m in modules.items():
        m.load_state_dict({n[len(k) + 1:]: v for n, v in t.items() if n.startswith(k + ".")})
    for i, p in enumerate(ema.shadow_params):
        p.copy_(t[f"ema.{i}"])
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        st = {key.split(".", 2)[2]: v for key, v in t.items() if key.startswith(f"opt.{i}.")}
        if st:
            opt.state[p] = st
    gen.set_state(t["rng"])
    return json.loads((work / STATE_META).read_text())


# ----------------------------------------------------------------------------- training
def flow_loss(transformer, te1, te2, z0, ids, g: torch.Generator, sigma_sampling: dict | None = None
              ) -> torch.Tensor:
    """Masked-free flow-matching loss: |v(z_t, 1000σ) - (ε - z0)|², σ ~ U(0, 1) or, with
    ``sigma_sampling={"weighting_scheme": "logit_normal", "logit_mean": m, "logit_std": s}``,
    SD3's logit-normal (diffusers' compute_density_for_timestep_sampling)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    sampling = sigma_sampling or {"weighting_scheme": "uniform"}
    sigma = compute_density_for_timestep_sampling(batch_size=len(z0), generator=g, **sampling)
    eps = torch.randn(z0.shape, generator=g)
    s = sigma.view(-1, 1, 1, 1)
    emb, pooled = encode_ids(te1, te2, ids)
    pred = transformer(hidden_states=(1 - s) * z0 + s * eps, timestep=sigma * 1000,
                       encoder_hidden_states=emb, pooled_projections=pooled, return_dict=False)[0]
    return F.mse_loss(pred, eps - z0)


def train_dit(transformer, te1, te2, tokenizer, latents, captions, work: Path, budget_s: float,
              seed: int, batch: int = 32, lr: float = 1e-3, caption_dropout: float = 0.1,
              ema_decay: float = 0.999, max_steps: int = 1_000_000, checkpoint_s: float = 300,
              snapshot_s: float | None = 600, on_snapshot=None, sigma_sampling: dict | None = None,
              snapshot_steps: tuple[int, ...] = (), log=print):
    """Train transformer + text encoders (resuming from ``work`` when a state is there); returns
    (EMA, info). ``on_snapshot(step, ema, curve)`` every ``snapshot_s`` seconds of training, or
    at ``snapshot_steps`` when given (a time-boxed run replayed with fixed steps)."""
    from diffusers.training_utils import EMAModel

    g = torch.Generator().manual_seed(seed)
    kw = dict(padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
              return_tensors="pt")
    ids_all, empty = tokenizer(captions, **kw).input_ids, tokenizer([""], **kw).input_ids[0]
    params = [p for m in (transformer, te1, te2) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = EMAModel(transformer.parameters(), decay=ema_decay)
    modules = {"transformer": transformer, "te1": te1, "te2": te2}
    meta = _load_state(work, modules, ema, opt, g) or {"step": 0, "total": max_steps, "curve": [],
                                                       "seconds": 0.0, "planned": False}
    if meta["step"]:
        log(f"resumed at step {meta['step']}/{meta['total']}")
        if math.isinf(budget_s) and meta["total"] != max_steps:  # fixed steps given: they rule
            log(f"steps now {max_steps} (were {meta['total']})")
            meta.update(total=max_steps, planned=True, replanned_from=meta["total"])
    transformer.train(), te1.train(), te2.train()
    step, total, curve, running = meta["step"], meta["total"], meta["curve"], []
    resumed = meta["step"]
    t0, done_before = time.time(), meta["seconds"]
    last_ckpt = last_snap = time.time()
    while step < total:
        idx = torch.randint(len(latents), (batch,), generator=g)
        ids = ids_all[idx].clone()
        ids[torch.rand(batch, generator=g) < caption_dropout] = empty
        for grp in opt.param_groups:
            grp["lr"] = cosine_lr(step, total, 300, lr)
        running.append(clipped_step(opt, flow_loss(transformer, te1, te2, latents[idx], ids, g, sigma_sampling),
                                    params, ema, transformer))
        step += 1
        if not meta["planned"] and step == meta["step"] + 30:
            total = plan_steps((time.time() - t0) / 30, budget_s - done_before, max_steps) + meta["step"]
            meta["planned"] = True
            log(f"planned {total} steps ({(time.time() - t0) / 30:.3f} s/step)")
        if step % 100 == 0:
            curve.append({"step": step, "loss": float(np.mean(running)),
                          "t": round(done_before + time.time() - t0, 1)})
            running = []
            log(f"dit step {step}/{total} loss {curve[-1]['loss']:.4f}")
        seconds = done_before + time.time() - t0
        if time.time() - last_ckpt > checkpoint_s and step < total:
            meta.update(step=step, total=total, curve=curve, seconds=round(seconds, 1))
            _save_state(work, modules, ema, opt, meta, g)
            last_ckpt = time.time()
        timed = not snapshot_steps and snapshot_s is not None and time.time() - last_snap > snapshot_s
        if on_snapshot and (timed or step in snapshot_steps) and step < total:
            on_snapshot(step, ema, curve)
            last_snap = time.time()
    seconds = round(done_before + time.time() - t0, 1)
    return ema, {"steps": step, "seconds": seconds, "curve": curve, "resumed_from": resumed or None,
                 "replanned_from": meta.get("replanned_from")}


def _fixed_steps_command(steps: int, candidates: dict, arch: dict, sampling: dict | None) -> str:
    """The train-toy command that replays this run's steps and snapshots without a clock."""
    snaps = ",".join(str(k) for k in sorted(candidates) if k != steps)
    sampling = sampling or {"weighting_scheme": "uniform"}
    return (f"python -m fgbg_utils train-toy --model dit --dit-steps {steps} --snapshot-steps {snaps} "
            f"--dit-patch-size {arch['patch_size']} --dit-token-std {arch['token_std']:g} "
            f"--dit-sigma {sampling['weighting_scheme']} --dit-logit-mean {sampling.get('logit_mean', 0.0):g}")


def _sigma_text(sampling: dict | None) -> str:
    if not sampling or sampling.get("weighting_scheme") == "uniform":
        return "uniform(0, 1); timestep 1000 σ; target ε − z0"
    return (f"logit-normal: σ = sigmoid(N({sampling['logit_mean']}, {sampling['logit_std']}²)); "
            f"timestep 1000 σ; target ε − z0")


def _validate(candidates: dict[int, Path], work: Path, validation: dict | None, log) -> dict[int, float]:
    from fgbg_utils.training.toy_recipe import validation_iou

    scores = {}
    for step, folder in candidates.items():
        res = validation_iou(folder, work / "validation" / f"step_{step:06d}", validation)
        scores[step] = round(float(res["iou"]), 4)
        log(f"validation: step {step} pooled M_pre IoU {scores[step]:.3f}")
    return scores


def train_toy_dit(out_dir: str | Path = "models/toy-dit", work_dir: str | Path = "work_toy_dit", *,
                  vae_from: str | Path = "models/toy-ldm", n_images: int = 20_000, seed: int = 1001,
                  minutes: float = 35, steps: int | None = None, snapshot_minutes: float | None = 10,
                  threads: int = 1, arch: dict | None = None, lr: float = 1e-3, batch: int = 32,
                  select_on_validation: bool = True, validation: dict | None = None,
                  sigma_sampling: dict | None = None, snapshot_steps: tuple[int, ...] = (),
                  log=print) -> dict:
    """Train the toy MMDiT on ``n_images`` toy images (generator v2, corpus ``seed``) with the
    VAE of ``vae_from``, time-boxed to ``minutes`` (or ``steps``), resumable from ``work_dir``;
    select the EMA snapshot with the best validation M_pre IoU; write ``out_dir``."""
    torch.set_num_threads(threads)
    started = time.time()
    work, out = Path(work_dir), Path(out_dir)
    work.mkdir(parents=True, exist_ok=True)
    images, _, captions, _ = generate_corpus(n_images, seed, 64, 0.15, 2)
    vae = load_toy_vae(vae_from)
    latents = encode_latents(vae, images) * vae.config.scaling_factor
    del images
    transformer, te1, te2, tokenizer, scheduler = build_dit_models(seed, arch, latents.shape[-1])
    a = {**DIT_ARCH, **(arch or {})}
    info = {"model": "toy MMDiT (SD3Transformer2DModel, flow matching)", "seed": seed,
            "n_images": n_images, "image_size": 64, "threads": threads, "generator_version": 2,
            "arch": a, "vae": f"copied from {vae_from} (shift_factor 0 added)",
            "parameters": sum(p.numel() for p in transformer.parameters())}
    snaps = work / "snapshots"

    def snapshot(step, ema, curve):
        t = copy.deepcopy(transformer)
        ema.copy_to(t.parameters())
        save_dit(snaps / f"step_{step:06d}", vae, t.eval(), te1, te2, tokenizer, scheduler,
                 {**info, "dit": {"steps": step, "curve": list(curve)}})
        log(f"snapshot at step {step}")

    budget = dict(budget_s=math.inf, max_steps=steps) if steps else dict(budget_s=minutes * 60)
    ema, dit_info = train_dit(transformer, te1, te2, tokenizer, latents, captions, work, seed=seed,
                              lr=lr, batch=batch, on_snapshot=snapshot, log=log,
                              sigma_sampling=sigma_sampling, snapshot_steps=tuple(snapshot_steps),
                              snapshot_s=None if snapshot_minutes is None else snapshot_minutes * 60,
                              **budget)
    ema.copy_to(transformer.parameters())
    info["dit"] = dit_info
    final = work / "final"
    save_dit(final, vae, transformer.eval(), te1.eval(), te2.eval(), tokenizer, scheduler, info)
    candidates = {int(p.name.split("_")[1]): p for p in sorted(snaps.glob("step_*")) if p.is_dir()}
    candidates[dit_info["steps"]] = final
    scores = _validate(candidates, work, validation, log) if select_on_validation else {}
    chosen = max(scores, key=lambda s: (scores[s], -s)) if scores else dit_info["steps"]
    info["selection"] = {"rule": "EMA snapshot with the best pooled M_pre IoU (stages 01-02, T0=40) "
                                 "on the validation world (dataset.seed=100)" if scores else "last weights",
                         "selected_step": chosen, "validation_iou_by_step": {str(k): v for k, v in scores.items()}}
    info["recipe"] = {"command": "python -m fgbg_utils train-toy --model dit", "minutes": minutes,
                      "steps": steps, "snapshot_minutes": snapshot_minutes, "lr": lr, "batch": batch,
                      "sigma": _sigma_text(sigma_sampling), "ema_decay": 0.999,
                      "caption_dropout": 0.1, "vae_from": str(vae_from),
                      "command_fixed_steps": _fixed_steps_command(dit_info["steps"], candidates, a,
                                                                  sigma_sampling)}
    info["training_minutes"] = round(dit_info["seconds"] / 60, 1)
    info["wall_minutes"] = round((time.time() - started) / 60, 1)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(candidates[chosen], tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    atomic_write_json(out / "training_info.json", info)
    log(f"shipped step {chosen} to {out} ({info['wall_minutes']} min wall time)")
    return info
