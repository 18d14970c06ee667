"""EMA of the weights: the update rule, the swap, and that every strategy validates, saves and
exports the average (real 2-process gloo runs for DDP, ZeRO and FSDP2)."""

import json
import sys

import pytest
import torch
from conftest import ROOT, run, torchrun_cmd, train_cmd
from torch import nn

from emotion_dist.modelio import load_checkpoint
from emotion_dist.training.ema import ModelEMA


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_update_follows_the_warmed_up_decay_and_copies_integer_buffers():
    m = _model()
    ema = ModelEMA(m, decay=0.9)
    start = [t.clone() for t in m.state_dict().values()]
    expected = [t.clone() for t in start]
    for step in range(1, 101):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * step)
        m(torch.randn(5, 3))  # training mode: BatchNorm updates its running stats and counter
        ema.update()
        d = min(0.9, step / (9 + step))
        expected = [e * d + t * (1 - d) if t.is_floating_point() else t.clone()
                    for e, t in zip(expected, m.state_dict().values())]
    assert ema.updates == 100 and ema.current_decay() == 0.9
    with ema.swapped():
        got = [t.clone() for t in m.state_dict().values()]
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, rtol=1e-5, atol=1e-6)
    assert m[1].num_batches_tracked.item() == got[-1].item() == 100


def test_swap_exchanges_and_restores_bit_exactly():
    m = _model()
    ema = ModelEMA(m, decay=0.5)
    with torch.no_grad():
        m[0].weight.add_(1.0)
    ema.update()
    live = {k: v.clone() for k, v in m.state_dict().items()}
    with ema.swapped():
        inside = {k: v.clone() for k, v in m.state_dict().items()}
    assert not torch.equal(inside["0.weight"], live["0.weight"])
    assert all(torch.equal(v, live[k]) for k, v in m.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_validation_sees_the_average_and_training_the_live_weights(fast_overrides, strategy):
    """Evaluating the swapped-in EMA and then the live weights on the wrapped model equals evaluating
    plain copies of each; under FSDP2 this needs the root's gathered parameters freed after eval."""
    helper = str(ROOT / "tests" / "helpers" / "ema_swap.py")
    out = run(torchrun_cmd(2, *fast_overrides, f"dist.strategy={strategy}", "train.ema_decay=0.9", "train.max_steps=13",
                           script=helper))
    assert f"EMA SWAP OK {strategy} world=2" in out.stdout


@pytest.mark.slow
def test_evaluate_and_export_use_the_average(tmp_path, fast_overrides):
    run(train_cmd(*fast_overrides, "train.ema_decay=0.95"))
    ckpt = tmp_path / "run/checkpoints/last.pt"
    state = load_checkpoint(ckpt)
    assert state["ema_updates"] == state["global_step"] == 42
    last = state["history"][-1]
    run([sys.executable, "-m", "emotion_dist.cli", "evaluate", "--checkpoint", str(ckpt), "--split", "val",
         *[o for o in fast_overrides if o.startswith(("data.", "run.cache_dir"))],
         "--json-out", str(tmp_path / "val.json")])
    val = json.loads((tmp_path / "val.json").read_text())
    assert val["accuracy"] == last["val_accuracy"] and abs(val["loss"] - last["val_loss"]) < 1e-5
    run([sys.executable, "-m", "emotion_dist.cli", "export", "--checkpoint", str(ckpt), "--format", "safetensors"])
    from safetensors.torch import load_file

    exported = load_file(str(ckpt.with_suffix(".safetensors")))
    assert all(torch.equal(exported[k], v) for k, v in state["ema_state_dict"].items())
    assert not torch.equal(exported["backbone.0.conv.weight"], state["model_state_dict"]["backbone.0.conv.weight"])
