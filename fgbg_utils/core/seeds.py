"""Per-draw seeds from (global seed, stage, image id): outputs do not depend on batch size or order."""
from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, stage: str, image_id: str = "") -> int:
    digest = hashlib.sha256(f"{seed}|{stage}|{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, stage: str, image_id: str = "") -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, stage, image_id))
