"""Dataset records, robust image/mask loading, and the toy dataset writer.

Layouts (docs/method.md §4):
* "folder" (also "toy"): ``root/images/<id>.<ext>``, optional ``root/masks/<id>.png``,
  optional ``root/split.csv`` (``id,split``) and ``root/captions.csv`` (``id,caption``).
  Without split.csv, splits come from a seeded permutation of the sorted ids.
* "cub": CUB-200-2011 native files (images.txt, train_test_split.txt, images/, segmentations/).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")
KINDS = ("folder", "toy", "cub")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
CHECK_SIDE = 256  # check_images decodes at about this size (JPEG: DCT-scaled, cheap)
EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that makes the stored pixels upright (as ImageOps.exif_transpose)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


class DatasetError(ValueError):
    """A dataset problem; the message names the path/parameter and the fix."""


class MaskSizeError(DatasetError):
    """A ground-truth mask whose aspect ratio differs from its image's."""


class CorruptImageError(DatasetError):
    """An image or mask file that PIL cannot open or decode."""


@dataclass
class Record:
    id: str
    image: Path
    mask: Path | None
    split: str
    caption: str | None = None


# ----------------------------------------------------------------------------- records
def load_records(kind: str, root: str | Path, seed: int = 0, test_fraction: float = 0.3,
                 splits: list[str] | None = None, limit: int | None = None) -> list[Record]:
    """Records of a dataset, sorted by id, filtered to ``splits``, at most ``limit`` per split."""
    if kind not in KINDS:
        raise DatasetError(f"unknown dataset.kind {kind!r}; set dataset.kind to one of {list(KINDS)}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset.root {str(root)!r} does not exist; set dataset.root in your "
                           f"params file to a folder with images/ (or the CUB_200_2011 folder for "
                           f"dataset.kind: cub)")
    for s in splits or ():
        if s not in SPLITS:
            raise DatasetError(f"unknown split {s!r} in dataset.splits; use a subset of {list(SPLITS)}")
    if limit is not None and limit < 0:
        raise DatasetError(f"dataset.limit must be >= 0 or null, got {limit}")
    records = _cub_records(root) if kind == "cub" else _folder_records(root, seed, test_fraction)
    records.sort(key=lambda r: r.id)
    if splits is not None:
        records = [r for r in records if r.split in splits]
    if limit is not None:
        counts: dict[str, int] = {}
        kept = []
        for r in records:
            if counts.get(r.split, 0) < limit:
                counts[r.split] = counts.get(r.split, 0) + 1
                kept.append(r)
        records = kept
    return records


def _folder_records(root: Path, seed: int, test_fraction: float) -> list[Record]:
    images = _list_images(root / "images")
    ids = sorted(images)
    split_file = root / "split.csv"
    if split_file.exists():
        split = _read_split_csv(split_file, set(ids))
    else:
        split = seeded_split(ids, seed, test_fraction)
    captions = _read_captions_csv(root / "captions.csv") if (root / "captions.csv").exists() else {}
    mask_dir = root / "masks"
    masks = _list_masks(mask_dir)
    return [Record(id=i, image=images[i], split=split[i], caption=captions.get(i), mask=masks.get(i))
            for i in ids]


def _list_masks(folder: Path) -> dict[str, Path]:
    """{id: masks/<id>.png} (ids NFC-normalised like the images')."""
    if not folder.is_dir():
        return {}
    return {file_id(p): p for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix.lower() == ".png" and not p.name.startswith(".")}


def _list_images(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DatasetError(f"images folder {str(folder)!r} does not exist; put the images in "
                           f"<dataset.root>/images/<id>.<ext> or fix dataset.root")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."):
            i = file_id(p)  # hidden files (macOS "._x.jpg" resource forks) are not images
            if i in found:
                raise DatasetError(f"two images share the id {i!r}: {found[i]} and {p}; "
                                   f"remove or rename one of them")
            found[i] = p
    if not found:
        raise DatasetError(f"no images found in {str(folder)!r} (extensions {list(IMAGE_EXTS)}); "
                           f"add images there or fix dataset.root")
    return found


def file_id(path: Path) -> str:
    """The id of an image file: its name without extension, Unicode NFC-normalised (macOS writes
    decomposed names; split.csv/captions.csv usually hold the composed form)."""
    return unicodedata.normalize("NFC", Path(path).stem)


def _read_csv(path: Path, header: list[str]) -> list[tuple[int, list[str]]]:
    """Rows (line number, fields) of a CSV whose first line must equal ``header``."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [(n + 1, row) for n, row in enumerate(csv.reader(f))]
    if not rows or [c.strip() for c in rows[0][1]] != header:
        raise DatasetError(f"{path}: line 1 must be the header {','.join(header)!r}; fix the file")
    out = []
    for line, row in rows[1:]:
        if not row:
            continue
        if len(row) != len(header):
            raise DatasetError(f"{path}: line {line} has {len(row)} fields, expected "
                               f"{len(header)} ({','.join(header)}); fix that line")
        out.append((line, row))
    return out


def _read_split_csv(path: Path, ids: set[str]) -> dict[str, str]:
    split: dict[str, str] = {}
    for line, (i, s) in _read_csv(path, ["id", "split"]):
        i, s = unicodedata.normalize("NFC", i.strip()), s.strip()
        if s not in SPLITS:
            raise DatasetError(f"{path}: line {line}: split {s!r} is not one of {list(SPLITS)}; "
                               f"fix that line")
        if i not in ids:
            raise DatasetError(f"{path}: line {line}: id {i!r} has no image in images/; "
                               f"remove the line or add the image")
        split[i] = s
    missing = sorted(ids - split.keys())
    if missing:
        raise DatasetError(f"{path}: {len(missing)} image(s) have no split, e.g. {missing[:5]}; "
                           f"add lines for them or delete split.csv to use a seeded split")
    return split


def _read_captions_csv(path: Path) -> dict[str, str]:
    return {unicodedata.normalize("NFC", i.strip()): c
            for _, (i, c) in _read_csv(path, ["id", "caption"])}


def seeded_split(ids: list[str], seed: int, test_fraction: float) -> dict[str, str]:
    """Seeded permutation of the sorted ids: first round(test_fraction·n) are test, rest train."""
    if not 0.0 <= test_fraction <= 1.0:
        raise DatasetError(f"dataset.test_fraction must be in [0, 1], got {test_fraction}")
    ids = sorted(ids)
    perm = np.random.default_rng(seed).permutation(len(ids))
    n_test = int(round(test_fraction * len(ids)))
    test = {ids[j] for j in perm[:n_test]}
    return {i: "test" if i in test else "train" for i in ids}


def cub_id(relpath: str) -> str:
    """Filesystem-safe id of a CUB relpath: '/' → '__', extension dropped."""
    return str(Path(relpath).with_suffix("")).replace("\\", "/").replace("/", "__")


def _read_pairs(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise DatasetError(f"CUB file {str(path)!r} is missing; point dataset.root at the "
                           f"CUB_200_2011 folder (with images.txt, train_test_split.txt, images/)")
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2:
            raise DatasetError(f"{path}: line {n} is not '<id> <value>': {line!r}; fix that line")
        out[parts[0]] = parts[1]
    return out


def _cub_records(root: Path) -> list[Record]:
    """CUB-200-2011; masks are None when segmentations/ (a separate download) lacks the file."""
    paths = _read_pairs(root / "images.txt")
    is_train = _read_pairs(root / "train_test_split.txt")
    if not (root / "images").is_dir():
        raise DatasetError(f"CUB images folder {str(root / 'images')!r} is missing; point "
                           f"dataset.root at the CUB_200_2011 folder")
    records = []
    for num, rel in paths.items():
        flag = is_train.get(num)
        if flag not in ("0", "1"):
            raise DatasetError(f"{root / 'train_test_split.txt'}: image id {num} has is_train "
                               f"{flag!r}, expected 0 or 1; fix the file")
        seg = (root / "segmentations" / rel).with_suffix(".png")
        records.append(Record(id=cub_id(rel), image=root / "images" / rel,
                              mask=seg if seg.is_file() else None,
                              split="train" if flag == "1" else "test"))
    return records


# ----------------------------------------------------------------------------- pixels
def _decode_error(path: Path, e: Exception) -> CorruptImageError:
    if isinstance(e, Image.DecompressionBombError):
        return CorruptImageError(f"{str(path)!r} has more pixels than PIL's safety limit ({e}); if "
                                 f"you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS, or remove it")
    return CorruptImageError(f"cannot decode {str(path)!r} ({type(e).__name__}: {e}); "
                             f"remove or replace the file")


def _orientation(im: Image.Image) -> int:
    o = im.getexif().get(EXIF_ORIENTATION, 1)
    return o if o in _UPRIGHT else 1


def _draft(im: Image.Image, max_side: int) -> None:
    """JPEG: let libjpeg decode at 1/2, 1/4 or 1/8 scale, keeping the long side >= max_side."""
    long = max(im.size)
    if long > 2 * max_side:
        im.draft(None, (max(1, -(-im.width * max_side // long)), max(1, -(-im.height * max_side // long))))


def _open(path: str | Path, max_side: int | None = None) -> Image.Image:
    """Open and fully decode a file, upright (EXIF orientation applied); with ``max_side``, JPEGs
    are decoded at a reduced scale. Raises CorruptImageError / DatasetError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"file {str(path)!r} does not exist; fix the dataset or dataset.root")
    try:
        with Image.open(path) as im:
            if max_side:
                _draft(im, max_side)
            im.load()
            return ImageOps.exif_transpose(im)  # a decoded copy, upright
    except _DECODE_ERRORS as e:
        raise _decode_error(path, e) from e


def image_size(path: str | Path) -> tuple[int, int]:
    """(h, w) of ``load_image(path)`` at full size, read from the header only (EXIF-upright)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"file {str(path)!r} does not exist; fix the dataset or dataset.root")
    try:
        with Image.open(path) as im:
            w, h = im.size
            return (w, h) if _orientation(im) in (5, 6, 7, 8) else (h, w)
    except _DECODE_ERRORS as e:
        raise _decode_error(path, e) from e


def _reduce(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """Box-downscale by an integer factor so the long side stays >= max_side (< 2 max_side)."""
    factor = max(rgb.shape[:2]) // max_side
    if factor < 2:
        return rgb
    return np.asarray(Image.fromarray(rgb).reduce(factor), np.uint8).copy()


def _over_black(rgba: Image.Image) -> np.ndarray:
    a = np.asarray(rgba, np.float32)
    rgb = a[..., :3] * (a[..., 3:4] / 255.0)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, np.uint8).copy()
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        grey = np.clip(np.round(np.asarray(im, np.float64) * (255.0 / 65535.0)), 0, 255)
        return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
    if mode == "F":  # float images: [0, 1] if the max is <= 1, else taken as [0, 255]
        a = np.asarray(im, np.float64)
        a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a
        grey = np.clip(np.round(np.nan_to_num(a)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        return _over_black(im.convert("RGBA"))
    return np.asarray(im.convert("RGB"), np.uint8).copy()  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_image(path: str | Path, max_side: int | None = None) -> np.ndarray:
    """uint8 HxWx3 RGB, upright (EXIF orientation applied, as photo viewers show it); alpha
    composited over black, 16-bit scaled by 255/65535, CMYK/palette/grey converted.

    ``max_side``: only the canonical frame is needed (e.g. the model resolution R): the image is
    decoded reduced (JPEG DCT scaling, then an integer box reduce) to a long side in
    [max_side, 2·max_side), never enlarged; the full size stays available from ``image_size``.
    """
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1 or None, got {max_side}")
    im = _open(path, max_side)
    try:
        rgb = _to_rgb(im)
    except _DECODE_ERRORS as e:
        raise CorruptImageError(f"cannot convert {str(path)!r} (mode {im.mode}) to RGB "
                                f"({type(e).__name__}: {e}); re-save it as 8-bit RGB") from e
    return _reduce(rgb, max_side) if max_side else rgb


def _grey(im: Image.Image) -> tuple[np.ndarray, float]:
    """Grey array and the max of its dtype range."""
    if im.mode == "1":
        return np.asarray(im, np.uint8), 1.0
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return np.asarray(im, np.int64), 65535.0
    if im.mode == "F":
        a = np.nan_to_num(np.asarray(im, np.float64))
        return a, 1.0 if a.size and a.max() <= 1.0 else 255.0
    return np.asarray(im.convert("L"), np.uint8), 255.0


def _aspect_close(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return abs(a[0] * b[1] - a[1] * b[0]) <= 0.02 * max(a[0] * b[1], a[1] * b[0])


def _orient_like_image(mask: Image.Image, own: int, image: Path) -> Image.Image:
    """Give a mask its image's upright orientation. A mask with its own EXIF orientation is
    already upright (_open). Otherwise it is taken as annotated on the image's STORED pixel grid
    and gets the image's transpose, unless its aspect matches only the upright image."""
    with Image.open(image) as im:
        orient, (w, h) = _orientation(im), im.size
    if own != 1 or orient == 1:
        return mask
    stored, upright = (h, w), ((w, h) if orient in (5, 6, 7, 8) else (h, w))
    shape = (mask.height, mask.width)
    if _aspect_close(shape, upright) and not _aspect_close(shape, stored):
        return mask
    return mask.transpose(_UPRIGHT[orient])


def load_mask(path: str | Path, shape: tuple[int, int] | None = None,
              image: str | Path | None = None) -> np.ndarray:
    """bool HxW: foreground = value > half the dtype max (a mask whose max is 1 is read as 0/1).

    ``image``: the mask's image; the mask is oriented like ``load_image(image)`` (see
    `_orient_like_image`) and ``shape`` defaults to ``image_size(image)``.
    If ``shape`` is given and differs, the mask is resized (nearest) with a warning.
    """
    mim = _open(path)
    try:
        if image is not None:
            with Image.open(path) as raw:
                own = _orientation(raw)
            mim = _orient_like_image(mim, own, Path(image))
            shape = shape or image_size(image)
        grey, top = _grey(mim)
    except DatasetError:
        raise
    except _DECODE_ERRORS as e:  # e.g. a truncated file: named, not a bare OSError
        raise _decode_error(Path(path), e) from e
    if grey.size and grey.max() == 1:
        top = 1.0
    mask = grey > top / 2.0
    if shape is not None and tuple(shape) != mask.shape:
        (mh, mw), (h, w) = mask.shape, shape
        if not _aspect_close((mh, mw), (h, w)):
            raise MaskSizeError(f"mask {str(path)!r} is {mw}x{mh} but its image is {w}x{h} (another "
                                f"aspect ratio): it cannot belong to this image. Fix or remove the mask.")
        warnings.warn(f"mask size {mask.shape[1]}x{mask.shape[0]} of {str(path)!r} differs from "
                      f"image size {shape[1]}x{shape[0]}; resized with nearest", stacklevel=2)
        im = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.NEAREST)
        mask = np.asarray(im) > 127
    return mask


def load_ground_truth(records: list[Record]) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """{id: bool mask at image size} for the records whose mask loads; the rest are listed as
    (id, reason): no mask file, unreadable, or a size that cannot be fixed."""
    masks, skipped = {}, []
    for r in records:
        if r.mask is None:
            skipped.append((r.id, "no ground-truth mask"))
            continue
        try:
            masks[r.id] = load_mask(r.mask, image=r.image)
        except DatasetError as e:
            skipped.append((r.id, str(e)))
    return masks, skipped


def check_images(records: list[Record], on_corrupt: str = "skip"
                 ) -> tuple[list[Record], list[tuple[str, str]]]:
    """Decode every image (at about CHECK_SIDE px: all of the file is read, little memory).
    Returns (good records, [(path, reason)] of bad ones)."""
    if on_corrupt not in ("skip", "error"):
        raise DatasetError(f"dataset.on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
    good, bad = [], []
    for r in records:
        try:
            load_image(r.image, max_side=CHECK_SIDE)
            good.append(r)
        except DatasetError as e:
            cause = e.__cause__
            bad.append((str(r.image), f"{type(cause).__name__}: {cause}" if cause else str(e)))
    listing = "\n".join(f"  {p}: {why}" for p, why in bad)
    if bad and on_corrupt == "error":
        raise CorruptImageError(f"{len(bad)} unreadable image(s):\n{listing}\nremove or replace "
                                f"these files, or set dataset.on_corrupt: skip")
    if not good:
        raise DatasetError(f"no readable images left (of {len(records)}); check dataset.root "
                           f"and the image files" + (f":\n{listing}" if bad else ""))
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image(s):\n{listing}", stacklevel=2)
    return good, bad


# ----------------------------------------------------------------------------- toy writer
def _toy_params(n_train, n_test, seed, image_size, background_fraction, backgrounds="corpus") -> dict:
    from fgbg_utils.data.toy import GENERATOR_VERSION

    out = {"generator": "fgbg_utils.data.toy.generate_arrays", "version": GENERATOR_VERSION,
           "n_train": int(n_train),
           "n_test": int(n_test), "seed": int(seed), "image_size": int(image_size),
           "background_fraction": float(background_fraction)}
    if backgrounds != "corpus":  # corpus worlds keep the keys they had before the option
        out["backgrounds"] = backgrounds
    return out


def _existing_params(root: Path) -> dict | None:
    try:
        return json.loads((root / "dataset.json").read_text(encoding="utf-8")).get("params")
    except (OSError, ValueError, AttributeError):
        return None


def _check_existing(root: Path, params: dict) -> bool:
    """True on a cache hit; False if root is absent or an empty folder; else DatasetError."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return False
    old = _existing_params(root)
    if old == params:
        return True
    raise DatasetError(f"{str(root)!r} already exists with different contents (generator params "
                       f"{old} != requested {params}); choose another root or delete it")


def _write_toy_files(tmp: Path, params: dict) -> None:
    from fgbg_utils.data import toy

    n_train, n = params["n_train"], params["n_train"] + params["n_test"]
    images, masks, captions, metas = toy.generate_arrays(
        n, params["seed"], params["image_size"], params["background_fraction"],
        params.get("backgrounds", "corpus"))
    (tmp / "images").mkdir(parents=True)
    (tmp / "masks").mkdir()
    entries = []
    for i in range(n):
        rid, split = f"{i:05d}", "train" if i < n_train else "test"
        Image.fromarray(images[i]).save(tmp / "images" / f"{rid}.png")
        Image.fromarray(masks[i].astype(np.uint8) * 255, "L").save(tmp / "masks" / f"{rid}.png")
        entries.append({"id": rid, "split": split, "caption": captions[i], **metas[i]})
    for name, key in (("split.csv", "split"), ("captions.csv", "caption")):
        with open(tmp / name, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", key])
            w.writerows([e["id"], e[key]] for e in entries)
    (tmp / "dataset.json").write_text(json.dumps(
        {"layout": "folder", "params": params, "images": entries}, indent=1), encoding="utf-8")


def write_toy_dataset(root: str | Path, n_train: int, n_test: int, seed: int,
                      image_size: int = 64, background_fraction: float = 0.0,
                      backgrounds: str = "corpus") -> Path:
    """Write the toy shapes dataset in the folder layout (atomic; cached on equal params)."""
    root = Path(root)
    if n_train < 0 or n_test < 0 or n_train + n_test < 1:
        raise DatasetError(f"toy dataset needs n_train, n_test >= 0 and at least one image, "
                           f"got n_train={n_train}, n_test={n_test}; fix the toy params")
    params = _toy_params(n_train, n_test, seed, image_size, background_fraction, backgrounds)
    if _check_existing(root, params):
        return root
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_toy_files(tmp, params)
        if root.is_dir():
            root.rmdir()  # empty folder (checked above)
        os.rename(tmp, root)
    except OSError:
        if _check_existing(root, params):  # another process finished first with the same params
            return root
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
