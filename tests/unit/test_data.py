import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emotion_dist.config import ConfigError, load_config
from emotion_dist.data.datasets import decode_all, load_datasets, stratified_split
from emotion_dist.data.readers.folder import find_splits, scan
from emotion_dist.data.readers.synthetic import CLASSES, generate


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.jpg")):
        h.update(p.relative_to(folder).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_synthetic_is_deterministic_by_seed_and_in_kaggle_layout(tmp_path):
    a = generate(tmp_path / "a", 40, 14, seed=5)
    b = generate(tmp_path / "b", 40, 14, seed=5)
    c = generate(tmp_path / "c", 40, 14, seed=6)
    assert _digest(a) == _digest(b) != _digest(c)
    assert sorted(p.name for p in (a / "train" / "train").iterdir()) == CLASSES
    assert sorted(p.name for p in (a / "test" / "test").iterdir()) == CLASSES
    img = Image.open(next((a / "train/train/happy").glob("*.jpg")))
    assert img.size == (48, 48) and img.mode == "L"
    counts = {c: len(list((a / "train/train" / c).glob("*.jpg"))) for c in CLASSES}
    assert counts["disgust"] < counts["happy"]  # FER-like imbalance


def _write_tree(root: Path, classes=("a", "b"), n=4):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((48, 48), 40 * i, np.uint8)).save(root / c / f"{i}.png")


@pytest.mark.parametrize("layout", ["kaggle", "plain-test", "plain-val"])
def test_folder_layouts(tmp_path, layout):
    if layout == "kaggle":
        _write_tree(tmp_path / "train" / "train")
        _write_tree(tmp_path / "test" / "test")
        expect = (tmp_path / "train/train", tmp_path / "test/test")
    else:
        other = "test" if layout == "plain-test" else "val"
        _write_tree(tmp_path / "train")
        _write_tree(tmp_path / other)
        expect = (tmp_path / "train", tmp_path / other)
    assert find_splits(tmp_path) == expect


def test_class_sets_must_match_and_classes_must_not_be_empty(tmp_path):
    _write_tree(tmp_path / "train", ("a", "b"))
    _write_tree(tmp_path / "test", ("a", "c"))
    classes, _, _ = scan(tmp_path / "train")
    with pytest.raises(ConfigError, match="differ from the training classes"):
        scan(tmp_path / "test", classes)
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no images"):
        scan(tmp_path / "train")


def test_stratified_split_is_disjoint_seeded_and_stratified():
    labels = np.repeat(np.arange(4), [50, 10, 30, 2])
    tr, va = stratified_split(labels, 0.2, seed=1)
    assert set(tr).isdisjoint(va) and len(tr) + len(va) == len(labels)
    assert np.bincount(labels[va]).tolist() == [10, 2, 6, 1]
    tr2, va2 = stratified_split(labels, 0.2, seed=1)
    assert (va == va2).all()
    assert not (va == stratified_split(labels, 0.2, seed=2)[1]).all()


def test_bad_files_are_skipped_and_unusual_modes_decoded(tmp_path):
    root = tmp_path / "train" / "x"
    root.mkdir(parents=True)
    Image.fromarray(np.full((48, 48), 100, np.uint8)).save(root / "ok.png")
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("not an image")
    good = root / "ok.png"
    (root / "truncated.jpg").write_bytes(open(generate(tmp_path / "s", 14, 7) / "train/train/happy" /
                                              os.listdir(tmp_path / "s/train/train/happy")[0], "rb").read()[:200])
    Image.fromarray(np.full((48, 48, 4), 200, np.uint8), "RGBA").save(root / "rgba.png")
    Image.new("CMYK", (48, 48), (0, 0, 0, 0)).save(root / "cmyk.jpg")
    Image.fromarray(np.linspace(0, 65535, 48 * 48).reshape(48, 48).astype(np.uint16)).save(root / "deep16.png")
    Image.new("P", (48, 48), 3).save(root / "palette.png")
    _, files, labels = scan(tmp_path / "train")
    dec = decode_all(files, labels, 1, tmp_path / "cache")
    skipped = {Path(f).name for f, _ in dec.skipped}
    assert skipped == {"zero.jpg", "text.jpg", "truncated.jpg"}
    assert dec.images.shape == (5, 1, 48, 48)
    names = [Path(f).name for f in dec.files]
    deep = dec.images[names.index("deep16.png"), 0]
    assert deep.min() == 0 and deep.max() == 255  # 16-bit scaled, not clipped
    assert good.name in names


def test_decoded_cache_is_rebuilt_when_a_file_changes(tmp_path):
    _write_tree(tmp_path / "t", ("a", "b"), n=2)
    _, files, labels = scan(tmp_path / "t")
    first = decode_all(files, labels, 1, tmp_path / "cache")
    assert first.images[0, 0, 0, 0] == 0
    Image.fromarray(np.full((48, 48), 77, np.uint8)).save(files[0])
    os.utime(files[0], ns=(1, 10**18))
    again = decode_all(files, labels, 1, tmp_path / "cache")
    assert again.images[0, 0, 0, 0] == 77


def test_kagglehub_reads_a_prepopulated_cache(tmp_path, monkeypatch):
    """The real kagglehub call, offline, on kagglehub's own cache layout with its completion marker."""
    cache = tmp_path / "kh"
    base = cache / "datasets" / "aadityasinghal" / "facial-expression-dataset"
    generate(base / "versions" / "1", 28, 14, seed=1)
    (base / "1.complete").write_text("")
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(cache))
    cfg, _ = load_config(None, ["data.source=kaggle", f"run.cache_dir={tmp_path / 'c'}"])
    from emotion_dist.data.datasets import dataset_root

    root = dataset_root(cfg)
    assert root == base / "versions" / "1"
    ds = load_datasets(cfg, root)
    assert ds.classes == CLASSES and len(ds.train) + len(ds.val) == 28 and len(ds.test) == 14


def test_kaggle_offline_failure_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("KAGGLE_API_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no network needed
    cfg, _ = load_config(None, ["data.source=kaggle", "data.kaggle_handle=nobody/nothing/versions/1"])
    from emotion_dist.data.datasets import dataset_root

    with pytest.raises(ConfigError, match="data.root=PATH"):
        dataset_root(cfg)
