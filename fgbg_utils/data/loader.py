"""The configured dataset: generate the toy world when asked, then load and check the records."""
from __future__ import annotations

from pathlib import Path

from fgbg_utils.runs.params import PROJECT_ROOT
from fgbg_utils.runs.run_folder import fingerprint


def toy_generator_params(cfg: dict) -> dict:
    from fgbg_utils.data.toy import GENERATOR_VERSION

    ds = cfg["dataset"]
    return {**{k: ds[k] for k in ("seed", "n_train", "n_test", "image_size", "background_fraction")},
            "generator_version": GENERATOR_VERSION}


def dataset_root(cfg: dict) -> Path:
    """The dataset folder; for the toy world it is generated (cached by its parameters)."""
    from fgbg_utils.data.datasets import write_toy_dataset

    ds = cfg["dataset"]
    if ds["kind"] != "toy":
        if ds["root"] is None:
            raise ValueError(f"`dataset.root` is not set; for dataset.kind={ds['kind']!r} set it to "
                             f"your dataset folder in the params file.")
        return Path(ds["root"])
    gen = toy_generator_params(cfg)
    root = Path(ds["root"]) if ds["root"] else PROJECT_ROOT / ".cache" / "toy-datasets" / f"toy-{fingerprint(gen)}"
    return write_toy_dataset(root, gen["n_train"], gen["n_test"], gen["seed"], gen["image_size"],
                             gen["background_fraction"])


def load_dataset(cfg: dict):
    """Records of the configured splits, with unreadable images skipped (listed) or refused."""
    from fgbg_utils.data.datasets import check_images, load_records

    ds = cfg["dataset"]
    records = load_records(ds["kind"], dataset_root(cfg), seed=ds["seed"],
                           test_fraction=ds["test_fraction"], splits=ds["splits"], limit=ds["limit"])
    if not ds["ground_truth"]:
        from dataclasses import replace
        records = [replace(r, mask=None) for r in records]
    return check_images(records, on_corrupt=ds["on_corrupt"])
