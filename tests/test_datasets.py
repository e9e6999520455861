import warnings

import numpy as np
import pytest
from PIL import Image

from fgbg_utils.data.datasets import (
    CorruptImageError, DatasetError, MaskSizeError, check_images, load_ground_truth, load_image, load_mask,
    load_records, write_toy_dataset)


def _img(path, h=8, w=8, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)
    return path


def _folder(root, n=10):
    for i in range(n):
        _img(root / "images" / f"im{i:02d}.png", value=10 * i)
    return root


def test_folder_seeded_split(tmp_path):
    root = _folder(tmp_path / "d")
    (root / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "masks" / "im03.png")
    a = load_records("folder", root, seed=1, test_fraction=0.3)
    b = load_records("folder", root, seed=1, test_fraction=0.3)
    assert [(r.id, r.split) for r in a] == [(r.id, r.split) for r in b]
    assert [r.id for r in a] == sorted(r.id for r in a)
    assert sum(r.split == "test" for r in a) == 3
    assert {r.id for r in a if r.mask is not None} == {"im03"}
    other = [load_records("toy", root, seed=s) for s in range(2, 6)]
    assert any([r.split for r in o] != [r.split for r in a] for o in other)
    assert len(load_records("folder", root, seed=1, splits=["test"])) == 3
    lim = load_records("folder", root, seed=1, limit=2)
    assert len(lim) == 4 and [r.id for r in lim if r.split == "train"] == \
        [r.id for r in a if r.split == "train"][:2]


def test_folder_split_csv_and_captions(tmp_path):
    root = _folder(tmp_path / "d", n=3)
    (root / "split.csv").write_text("id,split\nim00,train\nim01,val\nim02,test\n")
    (root / "captions.csv").write_text('id,caption\nim00,"a photo of a bird, flying"\n')
    recs = {r.id: r for r in load_records("folder", root)}
    assert [recs[i].split for i in ("im00", "im01", "im02")] == ["train", "val", "test"]
    assert recs["im00"].caption == "a photo of a bird, flying" and recs["im01"].caption is None


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="nope.*dataset.root"):
        load_records("folder", tmp_path / "nope")
    (tmp_path / "noimg").mkdir()
    with pytest.raises(DatasetError, match="images"):
        load_records("folder", tmp_path / "noimg")
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images found.*empty"):
        load_records("folder", tmp_path / "empty")
    root = _folder(tmp_path / "d", n=2)
    (root / "split.csv").write_text("id,split\nim00,train\nim01,holdout\n")
    with pytest.raises(DatasetError, match=r"split\.csv: line 3.*holdout"):
        load_records("folder", root)
    (root / "split.csv").write_text("id,split\nim00,train,x\n")
    with pytest.raises(DatasetError, match="line 2"):
        load_records("folder", root)
    with pytest.raises(DatasetError, match="dataset.kind"):
        load_records("coco", root)


def test_cub_layout(tmp_path):
    root = tmp_path / "CUB_200_2011"
    rels = ["001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg",
            "001.Black_footed_Albatross/Black_Footed_Albatross_0002_55.jpg",
            "002.Laysan_Albatross/Laysan_Albatross_0001_545.jpg",
            "002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg"]
    for k, rel in enumerate(rels):
        _img(root / "images" / rel)
        seg = (root / "segmentations" / rel).with_suffix(".png")
        seg.parent.mkdir(parents=True, exist_ok=True)
        m = np.zeros((8, 8), np.uint8)
        m[: k + 1] = 255
        Image.fromarray(m).save(seg)
    (root / "images.txt").write_text("".join(f"{i + 1} {r}\n" for i, r in enumerate(rels)))
    (root / "train_test_split.txt").write_text("1 1\n2 0\n3 0\n4 1\n")
    recs = load_records("cub", root)
    assert [r.id for r in recs][0] == "001.Black_footed_Albatross__Black_Footed_Albatross_0001_796111"
    assert [r.split for r in recs] == ["train", "test", "test", "train"]
    assert [load_mask(r.mask).sum() for r in recs] == [8, 16, 24, 32]
    assert load_image(recs[0].image).shape == (8, 8, 3)
    (root / "train_test_split.txt").unlink()
    with pytest.raises(DatasetError, match="train_test_split.txt"):
        load_records("cub", root)


def test_image_modes(tmp_path):
    g = np.array([[0, 128], [255, 7]], np.uint8)
    Image.fromarray(g).save(tmp_path / "l.png")
    assert np.array_equal(load_image(tmp_path / "l.png"), np.repeat(g[..., None], 3, 2))
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0]]], np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    assert out.tolist() == [[[200, 100, 50], [0, 0, 0]]]
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").tolist() == [[[0, 0, 0], [10, 20, 30]]]
    Image.fromarray(np.array([[0, 65535, 32768]], np.uint16)).save(tmp_path / "i16.png")
    out = load_image(tmp_path / "i16.png")
    assert out.dtype == np.uint8 and out.shape == (1, 3, 3)
    assert out[0, :, 0].tolist() == [0, 255, 128]
    Image.new("CMYK", (2, 2), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    assert load_image(tmp_path / "c.jpg").shape == (2, 2, 3)


def test_masks(tmp_path):
    Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8)).save(tmp_path / "01.png")
    assert load_mask(tmp_path / "01.png").tolist() == [[False, True], [True, False]]
    Image.fromarray(np.array([[0, 127, 128, 255]], np.uint8)).save(tmp_path / "g.png")
    assert load_mask(tmp_path / "g.png").tolist() == [[False, False, True, True]]
    m = np.zeros((4, 4), np.uint8)
    m[:2] = 255
    Image.fromarray(m).save(tmp_path / "small.png")
    with pytest.warns(UserWarning, match="small.png.*differs from image size"):
        big = load_mask(tmp_path / "small.png", shape=(8, 8))
    assert big.shape == (8, 8) and big[:4].all() and not big[4:].any()
    with pytest.raises(MaskSizeError, match="small.png.*4x4.*6x8.*aspect ratio"):
        load_mask(tmp_path / "small.png", shape=(8, 6))


def test_load_ground_truth_lists_what_it_skips(tmp_path):
    root = _folder(tmp_path / "d", n=4)
    (root / "masks").mkdir()
    for i in (0, 1, 3):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "masks" / f"im{i:02d}.png")
    Image.fromarray(np.zeros((5, 9), np.uint8)).save(root / "masks" / "im01.png")  # other aspect
    records = load_records("folder", root)
    masks, skipped = load_ground_truth(records)
    assert sorted(masks) == [records[0].id, records[3].id]
    reasons = dict(skipped)
    assert "aspect ratio" in reasons[records[1].id] and reasons[records[2].id] == "no ground-truth mask"


def test_corrupt_images(tmp_path):
    root = _folder(tmp_path / "d", n=3)
    (root / "images" / "bad.png").write_bytes(np.random.default_rng(0).bytes(300))
    recs = load_records("folder", root)
    with pytest.warns(UserWarning, match="bad.png") as rec:
        good, bad = check_images(recs)
    assert len(rec) == 1
    assert [r.id for r in good] == ["im00", "im01", "im02"] and bad[0][0].endswith("bad.png")
    with pytest.raises(CorruptImageError, match="(?s)bad.png.*on_corrupt: skip"):
        check_images(recs, on_corrupt="error")
    with pytest.raises(CorruptImageError, match="bad.png"):
        load_image(root / "images" / "bad.png")
    trunc = tmp_path / "trunc.png"  # opens fine, fails only on a real decode
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), np.uint8)).save(trunc)
    trunc.write_bytes(trunc.read_bytes()[:1500])
    with pytest.raises(CorruptImageError, match="trunc.png"):
        load_image(trunc)
    with pytest.raises(DatasetError):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_images([r for r in recs if r.id == "bad"])


def test_write_toy_dataset(tmp_path):
    a = write_toy_dataset(tmp_path / "a", 3, 2, seed=5, image_size=32)
    b = write_toy_dataset(tmp_path / "b", 3, 2, seed=5, image_size=32)
    files = sorted(p.name for p in (a / "images").iterdir())
    assert files == [f"{i:05d}.png" for i in range(5)]
    assert all((a / "images" / f).read_bytes() == (b / "images" / f).read_bytes() for f in files)
    recs = load_records("toy", a)
    assert [r.split for r in recs] == ["train"] * 3 + ["test"] * 2
    assert all(r.mask is not None and r.caption for r in recs)
    assert load_mask(recs[0].mask).any() and load_image(recs[0].image).shape == (32, 32, 3)
    assert not list(tmp_path.glob("*.tmp-*"))
    mtime = (a / "dataset.json").stat().st_mtime_ns
    assert write_toy_dataset(a, 3, 2, seed=5, image_size=32) == a  # cache hit
    assert (a / "dataset.json").stat().st_mtime_ns == mtime
    with pytest.raises(DatasetError, match="another root or delete"):
        write_toy_dataset(a, 3, 2, seed=6, image_size=32)
    c = write_toy_dataset(tmp_path / "c", 3, 2, seed=6, image_size=32)
    assert (c / "images" / "00000.png").read_bytes() != (a / "images" / "00000.png").read_bytes()
