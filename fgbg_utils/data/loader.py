"""The configured dataset: generate the toy world when asked, then load and check the records."""
from __future__ import annotations

from pathlib import Path

import hashlib
import json

from fgbg_utils.runs.params import PROJECT_ROOT


def toy_generator_params(cfg) -> dict:
    from fgbg_utils.data.toy import GENERATOR_VERSION

    ds = cfg.dataset
    return {**{k: getattr(ds, k) for k in ("seed", "n_train", "n_test", "image_size", "background_fraction")},
            "generator_version": GENERATOR_VERSION}


def dataset_root(cfg) -> Path:
    """The dataset folder; for the toy world it is generated (cached by its parameters)."""
    from fgbg_utils.data.datasets import write_toy_dataset

    ds = cfg.dataset
    if ds.kind != "toy":
        if ds.root is None:
            raise ValueError(f"`dataset.root` is not set; for dataset.kind={ds['kind']!r} set it to "
                             f"your dataset folder in the params file.")
        return Path(ds.root)
    gen = toy_generator_params(cfg)
    key = hashlib.sha256(json.dumps(gen, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(ds.root) if ds.root else PROJECT_ROOT / ".cache" / "toy-datasets" / f"toy-{key}"
    return write_toy_dataset(root, gen["n_train"], gen["n_test"], gen["seed"], gen["image_size"],
                             gen["background_fraction"])


def load_dataset(cfg, check: bool = True):
    """Records of the configured splits, with unreadable images skipped (listed) or refused.
    check=False: no decoding here (a stage that decodes each image anyway handles bad files then)."""
    from fgbg_utils.data.datasets import check_images, load_records

    ds = cfg.dataset
    records = load_records(ds.kind, dataset_root(cfg), seed=ds.seed,
                           test_fraction=ds.test_fraction, splits=ds.splits, limit=ds.limit)
    if not ds.ground_truth:
        from dataclasses import replace
        records = [replace(r, mask=None) for r in records]
    if not check:
        return records, []
    return check_images(records, on_corrupt=ds.on_corrupt)


def dataset_identity(cfg) -> dict:
    """What identifies the data a run was made for, independent of where it lies: the toy
    generator's parameters, or the images' relative paths, sizes and splits."""
    from fgbg_utils.data.datasets import DatasetError, load_records

    ds = cfg.dataset
    if ds.kind == "toy":
        return {"kind": "toy", **toy_generator_params(cfg)}
    try:
        records = load_records(ds.kind, dataset_root(cfg), seed=ds.seed, test_fraction=ds.test_fraction,
                               splits=ds.splits, limit=ds.limit)
    except (DatasetError, ValueError):
        return {"kind": ds.kind, "listing": None}
    root = dataset_root(cfg)
    h = hashlib.sha256()
    for r in records:
        rel = Path(r.image).relative_to(root) if Path(r.image).is_relative_to(root) else Path(r.image).name
        size = Path(r.image).stat().st_size if Path(r.image).exists() else -1
        h.update(f"{r.id}\t{r.split}\t{rel}\t{size}\n".encode())
    return {"kind": ds.kind, "n_images": len(records), "listing": h.hexdigest()[:16]}
