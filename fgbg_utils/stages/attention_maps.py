"""Stage 01: per-image attention maps M̂ of the object word (docs/method.md §2.1).

Reads the dataset, calls `FgBgPipeline.attention_maps` (the pretrained m) group by group, writes
DIR/01_attention_maps/maps/<id>.npz. Groups are fixed slices of the image list; under
`accelerate launch` each process takes whole groups (same bits as one process)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from fgbg_utils.core import attention, families, tokens
from fgbg_utils.core.frame import Frame
from fgbg_utils.data.datasets import CorruptImageError, DatasetError, image_size, load_image
from fgbg_utils.data.loader import load_dataset
from fgbg_utils.io import atomic_save_npz, atomic_write_json
from fgbg_utils.storage import locked_stage, update_stage
from fgbg_utils.stages.common import Shards, groups, load_pipeline, open_sharded

STAGE = "01_attention_maps"


def check_pretrained(path: str) -> None:
    """Stage 01 uses the pretrained model m, never a fine-tuned m' (docs/method.md §5.7)."""
    if (Path(path) / "fgbg_finetune.json").exists():
        raise ValueError(f"`model.path`={path} is a fine-tuned checkpoint from stage 03; stage 01 "
                         f"must use the pretrained model. Point model.path at the base model.")


def map_path(cfg, image_id: str) -> Path:
    return Path(cfg.run_dir) / STAGE / "maps" / f"{image_id}.npz"


def load_map(cfg, image_id: str) -> dict:
    with np.load(map_path(cfg, image_id)) as z:
        out = {k: z[k] for k in z.files}
    out["frame"] = Frame.from_dict(json.loads(str(out["frame"])))
    return out


def load_frame(cfg, image_id: str) -> Frame:
    """Only the canonical frame of an image's map file (the arrays are not read)."""
    with np.load(map_path(cfg, image_id)) as z:
        return Frame.from_dict(json.loads(str(z["frame"])))


def n_levels(cfg) -> int:
    """Noise levels computed per image: T0, or the whole grid for the T0 sweep."""
    a = cfg.attention
    return max(min(50, a.grid_steps) if a.sweep else cfg.T0, cfg.T0)


def read_images(records, resolution: int, on_corrupt: str):
    """Decode each image once (large ones reduced while decoding, their true size kept): returns
    (records read, images, true sizes, [(path, reason)] skipped)."""
    good, images, sizes, bad = [], [], [], []
    for r in records:
        try:
            size = image_size(r.image)
            images.append(load_image(r.image, max_side=resolution if max(size) > 2 * resolution else None))
            sizes.append(size)
            good.append(r)
        except DatasetError as e:
            if on_corrupt == "error":
                raise CorruptImageError(f"{e}\n(dataset.on_corrupt is error; set dataset.on_corrupt: "
                                        f"skip to skip and list unreadable images)") from None
            bad.append((str(r.image), str(e)))
    return good, images, sizes, bad


@locked_stage("01")
def run(cfg, force: bool = False, progress: bool = True, pipe=None, part: tuple[int, int] | None = None) -> dict:
    """Compute and save M̂ for every image of the configured splits; finished groups are skipped.
    `pipe`: an FgBgPipeline already holding the pretrained m of `model.path`. `part` = (k, n): only
    every n-th group to do, from the k-th, and no summary (the runner's parallel jobs; a later
    full run finds those groups done and writes the summary)."""
    check_pretrained(cfg.model.path)
    shards = Shards()
    out_dir, force = open_sharded(cfg, "01", force, shards)
    with shards.main_first():  # the main process writes the toy world when it is not cached yet
        records, skipped = load_dataset(cfg, check=False)
    pipe = pipe or load_pipeline(cfg)
    ldm = pipe.ldm
    words = cfg.words
    info = pipe.describe_words(cfg.resolved_prompt, words)
    if shards.is_main and any(w["split"] for w in info.values()):
        print("\n".join(tokens.describe_lines(info)))
    rows = attention.resolve_batch_rows(cfg.attention.batch_rows, ldm.unet, ldm.latent_size)
    by_id = {r.id: r for r in records}
    batches = groups([r.id for r in records], rows // n_levels(cfg))
    todo = shards.on_main(lambda: [g for g in batches
                                   if force or any(not map_path(cfg, i).exists() for i in g)])
    mine = shards.mine(todo)
    if part:
        mine = mine[part[0]::part[1]]
    bar = shards.bar(sum(map(len, mine)), "01 attention maps", "img", progress)
    for group in mine:
        good, images, sizes, bad = read_images([by_id[i] for i in group], ldm.resolution,
                                               cfg.dataset.on_corrupt)
        skipped += bad
        if good:
            maps = pipe.attention_maps(
                images, cfg.object, cfg.prompt, cfg.parts, cfg.T0, cfg.seed, [r.id for r in good],
                cfg.attention.grid_steps, cfg.attention.latent, rows, per_timestep=cfg.attention.sweep,
                per_layer=cfg.attention.keep_per_layer, per_token=cfg.attention.keep_per_layer,
                layers=cfg.attention.layers, aggregation=cfg.attention.aggregation,
                concepts=cfg.attention.concepts)
            save_maps(cfg, maps, sizes)
        bar.update(len(group))
    bar.close()
    if part:
        return {}
    shards.wait()
    bad_all = shards.gather(skipped)
    if not shards.is_main:
        return {}
    done = [r for r in records if map_path(cfg, r.id).exists()]
    if not done:  # a stage 01 of no image is not finished: nothing downstream can use it
        listed = "; ".join(f"{p} ({why})" for p, why in sorted(set(map(tuple, bad_all)))[:10])
        raise DatasetError(f"no image of the dataset could be read ({len(records)} listed"
                           + (f"; unreadable: {listed}" if listed else "") + "). Replace the "
                           "damaged files or point dataset.root at a folder of readable images.")
    positions = families.prompt_positions(ldm, cfg.resolved_prompt, words)
    summary = {"prompt": cfg.resolved_prompt, "token_positions": positions,
               "token_pieces": {w: d["tokens"] for w, d in info.items()},
               "timesteps": pipe.noise_levels(n_levels(cfg), cfg.attention.grid_steps).tolist(),
               "family": ldm.family,
               "T0": cfg.T0, "n_images": len(done), "n_computed": sum(map(len, todo)),
               "skipped_images": sorted(set(map(tuple, bad_all))), "images": [r.id for r in done],
               "splits": {r.id: r.split for r in done}, "resolution": ldm.resolution,
               "latent_size": ldm.latent_size, "vae_factor": ldm.vae_factor,
               "layers": pipe.layer_names(cfg.attention.layers, cfg.attention.aggregation),
               "aggregation": cfg.attention.aggregation, "processes": shards.count}
    atomic_write_json(out_dir / "summary.json", summary)
    update_stage(cfg, "01", complete=True, n_images=len(done))
    return summary


def save_maps(cfg, maps, sizes=None) -> None:
    """One npz per image: M̂ (normalised and raw), its frame (with the true image size), the noise
    levels, and the per-timestep / per-layer / per-token views when computed (float16)."""
    for i, image_id in enumerate(maps.ids):
        frame = maps.frames[i]
        if sizes is not None:
            frame = dataclasses.replace(frame, orig_h=int(sizes[i][0]), orig_w=int(sizes[i][1]))
        arrays = {"mhat": maps.mhat[i], "mhat_raw": maps.mhat_raw[i],
                  "frame": np.array(json.dumps(frame.to_dict())), "timesteps": maps.timesteps}
        for key in ("per_timestep", "per_layer", "per_token"):
            value = getattr(maps, key)
            if value is not None:
                arrays[key] = value[i].astype(np.float16)
        atomic_save_npz(map_path(cfg, image_id), **arrays)
