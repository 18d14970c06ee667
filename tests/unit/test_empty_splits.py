"""A split that would be empty is refused before training, in one line naming the fix: a
fer2013.csv without Training or PublicTest rows, and a folder too small to carve a validation split."""

import numpy as np
import pytest
from fer_files import FER_HEADER, pixels, write_fer
from PIL import Image

from emotion_dist.config import load_config
from emotion_dist.data.datasets import dataset_root, load_datasets
from emotion_dist.errors import DataError


def _face(seed: int) -> str:
    return pixels(np.random.default_rng(seed).integers(0, 256, (48, 48), dtype=np.uint8))


def _load(tmp_path, root, *extra, check_classes=True):
    cfg, _ = load_config(None, [f"data.root={root}", f"run.cache_dir={tmp_path / 'cache'}", *extra])
    return load_datasets(cfg, dataset_root(cfg), check_classes)


@pytest.mark.parametrize("usages, missing", [
    (["Training"] * 7, "PublicTest"),
    (["Training"] * 7 + ["PrivateTest"] * 7, "PublicTest"),
    (["PublicTest"] * 7, "Training"),
    ([], "Training or PublicTest"),  # the header alone
])
def test_fer_csv_without_training_or_publictest_rows_is_refused_before_training(tmp_path, usages, missing):
    csv = write_fer(tmp_path / "data" / "fer2013.csv",
                    [(str(i % 7), _face(i), u) for i, u in enumerate(usages)], FER_HEADER)
    with pytest.raises(DataError) as e:
        _load(tmp_path, csv, "model.num_classes=7")
    msg = str(e.value)
    assert f"no usable {missing} rows" in msg and "full fer2013.csv" in msg and "\n" not in msg
    assert str(csv) in msg


def test_fer_csv_with_every_split_trains_and_a_test_only_file_still_evaluates(tmp_path):
    rows = [(str(i % 7), _face(i), u) for i, u in enumerate(["Training"] * 7 + ["PublicTest"] * 7)]
    ds = _load(tmp_path, write_fer(tmp_path / "data" / "fer2013.csv", rows, FER_HEADER), "model.num_classes=7")
    assert len(ds.train) == 7 and len(ds.val) == 7 and ds.test is None
    test_only = write_fer(tmp_path / "data" / "private.csv", [(str(i % 7), _face(i), "PrivateTest") for i in range(7)])
    ds = _load(tmp_path, test_only, check_classes=False)  # what evaluate reads: no training checks
    assert len(ds.test) == 7


def _folder(root, per_class: dict[str, int]):
    for name, n in per_class.items():
        (root / "train" / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((48, 48), 40 * i + 10, np.uint8)).save(root / "train" / name / f"{i}.png")
    return root


@pytest.mark.parametrize("per_class", [{"happy": 1, "sad": 1}, {"happy": 1, "sad": 1, "fear": 1}])
def test_a_folder_too_small_for_a_validation_split_is_refused_naming_val_fraction(tmp_path, per_class):
    root = _folder(tmp_path / "data", per_class)
    with pytest.raises(DataError) as e:
        _load(tmp_path, root, f"model.num_classes={len(per_class)}")
    msg = str(e.value)
    assert "validation split is empty" in msg and "data.val_fraction=0.1" in msg and "at least two per class" in msg
    assert "happy 1" in msg and "\n" not in msg


def test_two_images_per_class_are_enough(tmp_path):
    ds = _load(tmp_path, _folder(tmp_path / "data", {"happy": 2, "sad": 2}), "model.num_classes=2")
    assert len(ds.train) == 2 and len(ds.val) == 2
