"""EmotionNet: logits in train and eval mode, in_channels honoured, the image sizes it takes and the
one-line error naming the nearest valid size, and its parameter count."""

import pytest
import torch

from emotion_dist.config import InvalidImageSize
from emotion_dist.model import EmotionNet, build_model, count_parameters


def test_parameter_count_matches_the_seed_model():
    assert count_parameters(EmotionNet(in_channels=3, num_classes=7)) == 1_768_551


@pytest.mark.parametrize("channels", [1, 3])
def test_logits_in_train_and_eval(channels):
    model = build_model(channels, 5, 64)
    x = torch.randn(3, channels, 64, 64)
    model.train()
    assert model(x).shape == (3, 5)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 5)
    # logits, not probabilities: rows do not sum to one and values can be negative
    assert not torch.allclose(out.sum(1), torch.ones(3))


def test_in_channels_is_honoured():
    assert EmotionNet(in_channels=1).backbone[0].conv.in_channels == 1
    assert EmotionNet(in_channels=3).backbone[0].conv.in_channels == 3


@pytest.mark.parametrize("size,hint", [(48, "32 or 64"), (112, "96 or 128"), (100, "96 or 128")])
def test_invalid_image_sizes_name_the_nearest_valid(size, hint):
    with pytest.raises(InvalidImageSize, match=hint):
        build_model(1, 7, size)


@pytest.mark.parametrize("size", [64, 96, 128, 224])
def test_valid_image_sizes_run(size):
    model = build_model(1, 7, size).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, size, size)).shape == (1, 7)
