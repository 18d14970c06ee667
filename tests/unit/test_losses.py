"""The training loss and its class weights (in-process, no training)."""

import torch
import torch.nn.functional as F

from emotion_dist.data.datasets import class_weights
from emotion_dist.training.losses import Criterion


def test_class_weight_scales_only_the_samples_own_loss_under_label_smoothing():
    """w_y x the smoothed loss. torch's weight= also weights the smoothing term by every class's
    weight, which pulled every image towards the rarest class (tools/recipe/README.md, R1)."""
    torch.manual_seed(0)
    logits, y = torch.randn(6, 7), torch.tensor([0, 1, 2, 3, 4, 5])
    w = torch.tensor([0.5, 9.5, 1.0, 0.4, 0.8, 1.2, 1.1])
    mask = torch.ones(6, dtype=torch.bool)
    got = Criterion(0.1, w)(logits, y, mask)
    want = (w[y] * F.cross_entropy(logits, y, label_smoothing=0.1, reduction="none")).sum()
    assert torch.allclose(got, want)
    # a uniform prediction of a common class's image is not pushed towards the rare class
    grad = torch.zeros(1, 7, requires_grad=True)
    Criterion(0.1, w)(grad, torch.tensor([3]), torch.ones(1, dtype=torch.bool)).backward()
    assert grad.grad[0, 3] < 0 and torch.allclose(grad.grad[0, [0, 1, 2, 4, 5, 6]], grad.grad[0, 0])
    # without smoothing it is torch's weighted cross-entropy; masked samples count nothing
    mask[5] = False
    got = Criterion(0.0, w)(logits, y, mask)
    assert torch.allclose(got, F.cross_entropy(logits[:5], y[:5], weight=w, reduction="none").sum())


def test_a_vote_distribution_is_weighted_by_its_expected_class_weight():
    logits, w = torch.randn(2, 3), torch.tensor([1.0, 2.0, 4.0])
    t = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    got = Criterion(0.0, w)(logits, t, torch.ones(2, dtype=torch.bool))
    want = (torch.tensor([1.5, 4.0]) * F.cross_entropy(logits, t, reduction="none")).sum()
    assert torch.allclose(got, want)


def test_sqrt_class_weights_are_the_square_roots_of_balanced():
    from types import SimpleNamespace

    train = SimpleNamespace(targets=lambda: [0] * 90 + [1] * 10)
    ds = SimpleNamespace(train=train, classes=["a", "b"])
    assert torch.allclose(class_weights(ds, "balanced"), torch.tensor([100 / 180, 100 / 20]))
    assert torch.allclose(class_weights(ds, "sqrt"), torch.tensor([100 / 180, 100 / 20]).sqrt())


def test_logit_adjustment_shifts_the_loss_by_the_log_prior_and_leaves_prediction_alone():
    """Menon et al. 2021: cross-entropy on logits + tau log(prior). The rare class must win by a
    margin of tau log(common/rare) for the same loss, so the plain logits then favour it."""
    from types import SimpleNamespace

    from emotion_dist.data.datasets import class_log_prior

    ds = SimpleNamespace(train=SimpleNamespace(targets=lambda: [0] * 90 + [1] * 10), classes=["a", "b"])
    prior = class_log_prior(ds)
    assert torch.allclose(prior, torch.tensor([0.9, 0.1]).log())
    logits, y, mask = torch.randn(4, 2), torch.tensor([0, 1, 1, 0]), torch.ones(4, dtype=torch.bool)
    got = Criterion(0.1, None, 2.0 * prior)(logits, y, mask)
    assert torch.allclose(got, F.cross_entropy(logits + 2.0 * prior, y, label_smoothing=0.1, reduction="sum"))
    # equal logits: the rare class's image costs more than the common one's (a larger margin is asked)
    zero = torch.zeros(2, 2)
    per = [Criterion(0.0, None, prior)(zero[:1], torch.tensor([c]), mask[:1]).item() for c in (0, 1)]
    assert per[1] > per[0]
