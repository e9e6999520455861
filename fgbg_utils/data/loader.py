"""The configured dataset: generate the toy world when asked, then load and check the records."""
from __future__ import annotations

from pathlib import Path

import hashlib
import json

from fgbg_utils.runs.params import PROJECT_ROOT


def toy_generator_params(cfg) -> dict:
    from fgbg_utils.data.toy import GENERATOR_VERSION

    ds = cfg.dataset
    out = {**{k: getattr(ds, k) for k in ("seed", "n_train", "n_test", "image_size", "background_fraction")},
           "generator_version": GENERATOR_VERSION}
    if ds.backgrounds != "corpus":  # corpus worlds keep the cache keys they had before the option
        out["backgrounds"] = ds.backgrounds
    return out


def dataset_root(cfg) -> Path:
    """The dataset folder; for the toy world it is generated (cached by its parameters)."""
    from fgbg_utils.data.datasets import write_toy_dataset

    ds = cfg.dataset
    if ds.kind != "toy":
        if ds.root is None:
            from fgbg_utils.data.datasets import DatasetError
            raise DatasetError(f"`dataset.root` is not set; for dataset.kind={ds.kind!r} set it to "
                               f"your dataset folder in the params file (or --set dataset.root=DIR).")
        return Path(ds.root)
    gen = toy_generator_params(cfg)
    key = hashlib.sha256(json.dumps(gen, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(ds.root) if ds.root else PROJECT_ROOT / ".cache" / "toy-datasets" / f"toy-{key}"
    return write_toy_dataset(root, gen["n_train"], gen["n_test"], gen["seed"], gen["image_size"],
                             gen["background_fraction"], gen.get("backgrounds", "corpus"))


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
        size = Path(r.image).stat().st_size if Path(r.image).exists() else -1
        h.update(f"{r.id}\t{r.split}\t{_relative(r.image, root)}\t{size}\n".encode())
    content = hashlib.sha256("".join(f"{k}\t{v}\n" for k, v in image_hashes(cfg, records).items())
                             .encode()).hexdigest()[:16]
    return {"kind": ds.kind, "n_images": len(records), "listing": h.hexdigest()[:16], "content": content}


def _relative(path, root: Path) -> str:
    path = Path(path)
    return (path.relative_to(root) if path.is_relative_to(root) else Path(path.name)).as_posix()


def _hash_cache(folder: Path) -> Path:
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return PROJECT_ROOT / ".cache" / "file-hashes" / f"{key}.json"


def image_hashes(cfg, records=None) -> dict[str, str]:
    """{image path relative to the dataset root: content hash} of the configured images (not the
    toy world, which its parameters identify); computed once per file, cached by path, size and
    mtime."""
    from fgbg_utils.storage.hashes import cached_hashes

    if cfg.dataset.kind == "toy":
        return {}
    root = dataset_root(cfg)
    if records is None:
        records = load_dataset(cfg, check=False)[0]
    paths = [Path(r.image) for r in records if Path(r.image).is_file()]
    hashes = cached_hashes(paths, _hash_cache(root))
    return {_relative(p, root): h[:16] for p, h in sorted(hashes.items())}


def changed_images(cfg, recorded: dict) -> list[str]:
    """The images whose content (or presence) differs from `recorded` ({path: hash})."""
    now = image_hashes(cfg)
    return sorted(k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k))


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def model_identity(cfg) -> dict[str, str]:
    """{'model:<weight file>': hash} of a local model (folder or single file); {} for a hub id
    (its `model.revision` identifies it). Cached by path, size and mtime."""
    from fgbg_utils.storage.hashes import cached_hashes

    path = Path(cfg.model.path)
    if not path.exists():
        return {}
    files = ([path] if path.is_file() else
             sorted(p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()))
    hashes = cached_hashes(files, _hash_cache(path))
    base = path.parent if path.is_file() else path
    return {f"model:{p.relative_to(base).as_posix()}": h[:12] for p, h in hashes.items()}
