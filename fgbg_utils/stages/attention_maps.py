"""Stage 01: per-image attention maps M̂ of the object word (METHOD §2.1)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fgbg_utils.core import attention, models, seeds, tokens
from fgbg_utils.data.loader import load_dataset
from fgbg_utils.core.frame import Frame, image_to_canvas
from fgbg_utils.io import atomic_save_npz, atomic_write_json
from fgbg_utils.runs.params import resolved_prompt
from fgbg_utils.runs.run_folder import locked_stage, open_stage, update_stage

STAGE = "01_attention_maps"


def check_pretrained(path: str) -> None:
    """Stage 01 uses the pretrained model m, never a fine-tuned m' (METHOD §5.7)."""
    if (Path(path) / "fgbg_finetune.json").exists():
        raise ValueError(f"`model.path`={path} is a fine-tuned checkpoint from stage 03; stage 01 "
                         f"must use the pretrained model. Point model.path at the base model.")


def map_path(cfg: dict, image_id: str) -> Path:
    return Path(cfg.run_dir) / STAGE / "maps" / f"{image_id}.npz"


def load_map(cfg: dict, image_id: str) -> dict:
    with np.load(map_path(cfg, image_id)) as z:
        out = {k: z[k] for k in z.files}
    out["frame"] = Frame.from_dict(json.loads(str(out["frame"])))
    return out


def load_frame(cfg: dict, image_id: str) -> Frame:
    """Only the canonical frame of an image's map file (the arrays are not read)."""
    with np.load(map_path(cfg, image_id)) as z:
        return Frame.from_dict(json.loads(str(z["frame"])))


@locked_stage("01")
def run(cfg, force: bool = False, progress: bool = True, ldm=None) -> dict:
    """Compute and save M̂ for every image of the configured splits; finished images are skipped.
    `ldm`: the pretrained model already loaded from cfg's model.path (stage 05 passes it)."""
    check_pretrained(cfg.model.path)
    out_dir, force = open_stage(cfg, "01", force)
    records, skipped = load_dataset(cfg)
    if ldm is None:
        ldm = models.load_ldm(cfg.model.path, cfg.model.revision, cfg.device, cfg.dtype, config=cfg.model.config)
    prompt = resolved_prompt(cfg)
    words = [cfg.object, *cfg.parts]
    positions = tokens.prompt_positions(ldm.tokenizer, prompt, words)
    flat = [p for w in words for p in positions[w]]
    grid_steps, T0 = cfg.attention.grid_steps, cfg.T0
    n_levels = min(50, grid_steps) if cfg.attention.sweep else T0
    n_levels = max(n_levels, T0)
    timesteps = models.lowest_timesteps(ldm.scheduler, n_levels, grid_steps)
    emb = models.encode_prompt(ldm, prompt)
    todo = [r for r in records if force or not map_path(cfg, r.id).exists()]
    per_group = max(1, cfg.attention.batch_rows // n_levels)
    layers = None
    bar = tqdm(total=len(todo), desc="01 attention maps", unit="img", disable=not progress)
    for start in range(0, len(todo), per_group):
        group = todo[start:start + per_group]
        layers = _process_group(cfg, ldm, group, emb, flat, timesteps, T0, grid_steps)
        bar.update(len(group))
    bar.close()
    summary = {"prompt": prompt, "token_positions": positions, "timesteps": timesteps.tolist(),
               "T0": T0, "n_images": len(records), "n_computed": len(todo),
               "skipped_images": skipped, "images": [r.id for r in records],
               "splits": {r.id: r.split for r in records}, "resolution": ldm.resolution,
               "latent_size": ldm.latent_size, "vae_factor": ldm.vae_factor,
               "layers": layers or _layer_names(ldm.unet)}
    atomic_write_json(out_dir / "summary.json", summary)
    update_stage(cfg, "01", complete=True, n_images=len(records))
    return summary


def _layer_names(unet) -> list[str]:
    return [n.removesuffix(".processor") for n in unet.attn_processors if n.endswith("attn2.processor")]


def _process_group(cfg, ldm, group, emb, token_positions, timesteps, T0, grid_steps):
    from fgbg_utils.data.datasets import load_image

    canvases, frames = [], []
    for r in group:
        canvas, frame = image_to_canvas(load_image(r.image), ldm.resolution, ldm.vae_factor)
        canvases.append(torch.from_numpy(canvas))
        frames.append(frame)
    x = torch.stack(canvases)
    if cfg.attention.latent == "mode":
        z0 = models.encode_images(ldm, x, "mode")
    else:
        z0 = torch.cat([models.encode_images(ldm, x[i:i + 1], "sample",
                                             seeds.generator(cfg.seed, "01-latent", r.id))
                        for i, r in enumerate(group)])
    shape = z0.shape[1:]
    noise = torch.stack([attention.image_noise(seeds.generator(cfg.seed, "01-noise", r.id),
                                               grid_steps, shape)[:len(timesteps)] for r in group])
    full = attention.attention_maps(ldm.unet, ldm.scheduler, z0, emb, token_positions, timesteps,
                                    noise, cfg.attention.batch_rows)
    red = {k: v.numpy() for k, v in attention.reduce_maps(full, T0).items()}
    for i, (r, frame) in enumerate(zip(group, frames)):
        valid = frame.valid(ldm.vae_factor)
        arrays = {"mhat": attention.minmax(red["mhat_raw"][i], valid),
                  "mhat_raw": red["mhat_raw"][i].astype(np.float32),
                  "frame": np.array(json.dumps(frame.to_dict())),
                  "timesteps": np.asarray(timesteps)}
        if cfg.attention.sweep:
            arrays["per_timestep"] = red["per_timestep"][i].astype(np.float16)
        if cfg.attention.keep_per_layer:
            arrays["per_layer"] = red["per_layer"][i].astype(np.float16)
            arrays["per_token"] = red["per_token"][i].astype(np.float16)
        atomic_save_npz(map_path(cfg, r.id), **arrays)
    return _layer_names(ldm.unet)
