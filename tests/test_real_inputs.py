"""Real-data inputs in `data/datasets.py`: EXIF-rotated JPEGs (image and mask upright alike), CMYK,
16-bit, grey, RGBA and palette images, a 10,000-px JPEG decoded without a memory blow-up,
non-ASCII and space-containing names, hidden and NFD-named files, CUB without some
segmentations, truncated files (skipped and listed, or refused per `on_corrupt`), and stages
01-02 on the odd-format photo folder of tests/fixtures/make_photos.py."""
import subprocess
import sys
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgbg_utils.data.datasets import (
    CorruptImageError,
    DatasetError,
    check_images,
    image_size,
    load_ground_truth,
    load_image,
    load_mask,
    load_records,
)
from tests.fixtures.make_photos import exif_rotated, make_photo_folder, source_photos

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    dst = tmp_path_factory.mktemp("photos")
    return dst, make_photo_folder(dst)


def test_every_odd_format_loads_upright_rgb(photos):
    _, info = photos
    for i, d in info.items():
        if d["shape"] is None:
            continue
        img = load_image(d["file"])
        assert img.dtype == np.uint8 and img.shape == (*d["shape"], 3), (i, img.shape)
        assert image_size(d["file"]) == d["shape"], i
        small = load_image(d["file"], max_side=40)  # 96 px -> reduced by 2
        assert small.shape == (d["shape"][0] // 2, d["shape"][1] // 2, 3), i


def test_pixel_values_of_odd_formats(photos):
    _, info = photos
    cat, coffee, astro, rocket, camera = source_photos()
    diff = lambda a, b: np.abs(a.astype(int) - b.astype(int)).mean()
    portrait = cat.transpose(1, 0, 2)[::-1]
    got = load_image(info["exif_rotated"]["file"])
    assert diff(got, portrait) < 4 < diff(got[::-1, ::-1], portrait)  # upright, not stored/flipped
    assert diff(load_image(info["cmyk"]["file"]), coffee) < 6  # CMYK converted, not inverted
    assert np.array_equal(load_image(info["rgb16"]["file"]), rocket)  # 16-bit RGB: x*257 -> x
    grey = np.asarray(Image.fromarray(astro).convert("L"))
    assert np.array_equal(load_image(info["grey16"]["file"])[..., 1], grey)
    grey8 = np.asarray(Image.fromarray(camera).convert("L"))
    assert np.array_equal(load_image(info["grey"]["file"]), np.repeat(grey8[..., None], 3, 2))
    rgba = load_image(info["rgba"]["file"])
    assert (rgba[:8] == 0).all() and np.array_equal(rgba[8:], astro[8:])  # transparent -> black
    pal = Image.open(info["palette"]["file"])
    transparent = np.asarray(pal) == 0
    assert transparent.any() and (load_image(info["palette"]["file"])[transparent] == 0).all()


def test_records_of_the_photo_folder_and_truncated_file(photos):
    dst, info = photos
    records = load_records("folder", dst)
    assert sorted(r.id for r in records) == sorted(info)
    assert "café au lait 1" in {r.id for r in records}
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable[\s\S]*truncated\.jpg"):
        good, bad = check_images(records, on_corrupt="skip")
    assert [Path(p).name for p, _ in bad] == ["truncated.jpg"] and "truncated" in bad[0][1]
    assert len(good) == len(info) - 1
    with pytest.raises(CorruptImageError, match=r"truncated\.jpg[\s\S]*dataset\.on_corrupt: skip"):
        check_images(records, on_corrupt="error")
    with pytest.raises(CorruptImageError, match="truncated.jpg.*remove or replace"):
        load_image(info["truncated"]["file"], max_side=16)  # the reduced decode notices it too


def _upright_pair(h=30, w=50):
    """An upright image with an off-centre bright block and its mask (asymmetric both ways)."""
    img = np.full((h, w, 3), 40, np.uint8)
    mask = np.zeros((h, w), bool)
    mask[3:12, 5:20] = True
    img[mask] = 220
    return img, mask


def test_exif_rotated_image_and_mask_are_upright_together(tmp_path):
    img, mask = _upright_pair()
    stored, exif = exif_rotated(img)
    stored.save(tmp_path / "a.jpg", quality=95, exif=exif)
    assert stored.size == (30, 50)  # stored 50 rows x 30 cols; upright 30 x 50
    loaded = load_image(tmp_path / "a.jpg")
    assert loaded.shape == (30, 50, 3) and image_size(tmp_path / "a.jpg") == (30, 50)
    assert np.array_equal(loaded.mean(2) > 130, mask)
    # a mask annotated on the stored pixel grid (no EXIF of its own) gets the image's rotation
    Image.fromarray(np.asarray(exif_rotated(mask.astype(np.uint8) * 255)[0])).save(tmp_path / "stored.png")
    assert np.array_equal(load_mask(tmp_path / "stored.png", image=tmp_path / "a.jpg"), mask)
    # a mask already drawn on the upright image is kept as it is
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "upright.png")
    assert np.array_equal(load_mask(tmp_path / "upright.png", image=tmp_path / "a.jpg"), mask)
    # ... and so in load_ground_truth, and through the folder layout
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "masks").mkdir()
    (tmp_path / "a.jpg").rename(tmp_path / "d" / "images" / "a.jpg")
    (tmp_path / "stored.png").rename(tmp_path / "d" / "masks" / "a.png")
    gt, skipped = load_ground_truth(load_records("folder", tmp_path / "d"))
    assert skipped == [] and np.array_equal(gt["a"], mask)


def test_exif_180_mask_on_stored_grid(tmp_path):
    img, mask = _upright_pair()
    exif = Image.Exif()
    exif[0x0112] = 3
    Image.fromarray(img[::-1, ::-1]).save(tmp_path / "b.jpg", quality=95, exif=exif.tobytes())
    Image.fromarray((mask[::-1, ::-1] * 255).astype(np.uint8)).save(tmp_path / "b.png")
    assert np.array_equal(load_image(tmp_path / "b.jpg").mean(2) > 130, mask)
    assert np.array_equal(load_mask(tmp_path / "b.png", image=tmp_path / "b.jpg"), mask)


BIG = (2500, 10000)  # (h, w): a 10,000-px panorama; 75 MB as decoded RGB


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory):
    path = tmp_path_factory.mktemp("huge") / "panorama.jpg"
    g = Image.linear_gradient("L").resize((BIG[1], BIG[0]))
    Image.merge("RGB", (g, g.transpose(Image.Transpose.FLIP_LEFT_RIGHT), g)).save(path, quality=80)
    return path


_PEAK = """
import resource, sys
from fgbg_utils.data.datasets import load_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
img = load_image(sys.argv[1], max_side=int(sys.argv[2]))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(img.shape[0], img.shape[1], (after - before) // 1024)
"""


def test_huge_jpeg_is_decoded_reduced(huge_jpeg):
    assert image_size(huge_jpeg) == BIG  # from the header: the size output masks need
    out = subprocess.run([sys.executable, "-c", _PEAK, str(huge_jpeg), "64"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.split()
    h, w, grown_mb = map(int, out)
    assert 64 <= w < 128 and abs(h - w * BIG[0] / BIG[1]) <= 1
    assert grown_mb < 20, f"peak memory grew by {grown_mb} MB; a full decode needs 75 MB"
    check_images([type("R", (), {"image": huge_jpeg, "id": "p"})()], on_corrupt="error")


def test_large_png_reduced_and_checked(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (300, 1000, 3), np.uint8)
    Image.fromarray(img).save(tmp_path / "wide.png")
    small = load_image(tmp_path / "wide.png", max_side=100)
    assert small.shape == (30, 100, 3)  # box-reduced by 10
    assert abs(small.mean() - img.mean()) < 1
    with pytest.raises(ValueError, match="max_side"):
        load_image(tmp_path / "wide.png", max_side=0)


def test_names_hidden_files_and_unicode_normalisation(tmp_path):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    nfd = unicodedata.normalize("NFD", "café crème")
    assert nfd != "café crème"
    for name in (f"{nfd}.jpg", "my bird 01.JPG", "鳥の写真.png"):
        Image.fromarray(np.full((8, 12, 3), 90, np.uint8)).save(root / "images" / name)
    (root / "images" / "._my bird 01.JPG").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS junk
    Image.fromarray(np.zeros((8, 12), np.uint8)).save(root / "masks" / f"{nfd}.png")
    (root / "split.csv").write_text("id,split\ncafé crème,test\nmy bird 01,train\n鳥の写真,test\n",
                                    encoding="utf-8")
    records = {r.id: r for r in load_records("folder", root)}
    assert set(records) == {"café crème", "my bird 01", "鳥の写真"}
    assert records["café crème"].split == "test" and records["café crème"].mask is not None
    good, bad = check_images(list(records.values()))
    assert bad == [] and all(load_image(r.image).shape == (8, 12, 3) for r in good)


def test_cub_with_missing_segmentations(tmp_path):
    from tests.test_sd_path import make_cub
    root = make_cub(tmp_path / "CUB_200_2011")
    segs = sorted((root / "segmentations").rglob("*.png"))
    for p in segs[:2]:
        p.unlink()
    records = load_records("cub", root)
    missing = {r.id for r in records if r.mask is None}
    assert len(missing) == 2 and len(records) == 6
    gt, skipped = load_ground_truth(records)
    assert set(gt) == {r.id for r in records} - missing
    assert sorted(skipped) == sorted((i, "no ground-truth mask") for i in missing)


def test_stages_01_02_on_the_photo_folder(photos, tmp_path):
    from fgbg_utils import load_params
    from fgbg_utils.stages import attention_maps, binarization
    dst, info = photos
    cfg = load_params(None, {"model.path": str(ROOT / "tests" / "fixtures" / "tiny-sd"),
                             "dataset.kind": "folder", "dataset.root": str(dst), "object": "bird",
                             "prompt": "a photo of a {object}", "T0": 2, "attention.sweep": False,
                             "device": "cpu", "dtype": "float32", "dataset.on_corrupt": "skip"},
                      run_dir=str(tmp_path / "run"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = attention_maps.run(cfg, progress=False)
    assert sorted(summary["images"]) == sorted(i for i, d in info.items() if d["shape"] is not None)
    assert [Path(p).name for p, _ in summary["skipped_images"]] == ["truncated.jpg"]
    for i in summary["images"]:
        frame = attention_maps.load_frame(cfg, i)
        assert (frame.orig_h, frame.orig_w) == info[i]["shape"]  # upright size, EXIF included
    result = binarization.run(cfg, progress=False)
    assert "no ground-truth" in result["note"]
    strict = load_params(None, {"model.path": cfg.model.path, "dataset.kind": "folder",
                                "dataset.root": str(dst), "object": "bird", "device": "cpu",
                                "dataset.on_corrupt": "error"}, run_dir=str(tmp_path / "run2"))
    with pytest.raises(DatasetError, match=r"truncated\.jpg[\s\S]*on_corrupt"):
        attention_maps.run(strict, progress=False)
