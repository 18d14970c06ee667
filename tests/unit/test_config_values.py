import re

import pytest
import yaml
from conftest import ROOT

from emotion_dist.config import ConfigError, load_config


def test_yaml_plus_dotted_overrides():
    cfg, given = load_config(str(ROOT / "configs/default.yaml"),
                             ["train.epochs=3", "data.image_size=96", "train.lr=1e-3"])
    assert cfg.train.epochs == 3 and cfg.data.image_size == 96 and cfg.train.lr == 1e-3
    assert {"train.epochs", "data.image_size"} <= given


def test_shipped_configs_are_valid():
    for path in (ROOT / "configs").glob("*.yaml"):
        load_config(str(path), ["run.resume=never"])


def test_unknown_key_names_close_matches():
    with pytest.raises(ConfigError, match="did you mean train.epochs"):
        load_config(None, ["train.epoch=3"])


@pytest.mark.parametrize("override,words", [
    ("train.precision=fp8", "allowed: fp32, bf16, fp16"),
    ("train.batch_size=0", "must be >= 1"),
    ("train.lr=0", "must be > 0"),
    ("train.lr=abc", "expected a number"),
    ("data.image_size=48", "use 32 or 64"),
    ("dist.strategy=deepspeed", "allowed: ddp, zero, fsdp"),
    ("run.resume=/nonexistent/x.pt", "run.resume"),
    ("data.val_fraction=1.5", "between 0 and 1"),
    ("train.ema_decay=1", "must be in [0, 1)"),
    ("train.patience=-1", "must be >= 0"),
])
def test_bad_values(override, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(None, [override])


def test_resolved_config_roundtrips(tmp_path):
    from emotion_dist.config import config_from_dict, save_config

    cfg, _ = load_config(None, ["train.epochs=4"])
    save_config(cfg, tmp_path / "c.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "c.yaml").read_text()))
    assert again == cfg
