"""The checkpoint format as inference reads it: a file written in-process loads into EmotionNet."""

import torch
from conftest import write_checkpoint

from emotion_dist.modelio import load_model


def test_a_checkpoint_loads_into_the_model_it_describes(unit_checkpoint):
    model, meta = load_model(unit_checkpoint)
    assert meta["classes"][0] == "angry" and meta["in_channels"] == 1 and meta["image_size"] == 32
    with torch.no_grad():
        logits = model(torch.zeros(2, 1, 32, 32))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()


def test_two_seeds_give_two_models(tmp_path):
    a, _ = load_model(write_checkpoint(tmp_path / "a.pt", seed=1))
    b, _ = load_model(write_checkpoint(tmp_path / "b.pt", seed=2))
    assert not torch.equal(next(a.parameters()), next(b.parameters()))
