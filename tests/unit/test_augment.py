"""The fast (batched, on-device) and classic (per-sample v2) pipelines, and the sampler."""

import pytest
import torch

from emotion_dist.config import load_config
from emotion_dist.data.augment import (
    BatchTransform,
    ClassicDataset,
    augment_params,
    augment_strength,
    gather_uint8,
    sample_uniforms,
)
from emotion_dist.data.datasets import load_datasets
from emotion_dist.data.sampler import ResumableSampler, eval_shard


@pytest.fixture(scope="module")
def ds(tiny_data, tmp_path_factory):
    cfg, _ = load_config(None, ["data.source=folder", f"data.root={tiny_data}",
                                f"run.cache_dir={tmp_path_factory.mktemp('c')}"])
    return load_datasets(cfg, tiny_data)


def test_uniforms_are_a_pure_function_of_seed_epoch_index():
    idx = torch.arange(1000)
    a = sample_uniforms(idx, 3, 1, 4)
    assert torch.equal(a, sample_uniforms(idx, 3, 1, 4))
    assert torch.equal(a[[5, 700]], sample_uniforms(torch.tensor([5, 700]), 3, 1, 4))
    assert not torch.equal(a, sample_uniforms(idx, 3, 2, 4)) and not torch.equal(a, sample_uniforms(idx, 4, 1, 4))
    assert 0 <= a.min() and a.max() < 1 and abs(a.mean().item() - 0.5) < 0.02


def test_fast_flip_rate_and_parameter_ranges():
    p = augment_params(torch.arange(20000), 0, 0)
    assert abs(p["flip"].float().mean().item() - 0.5) < 0.02
    assert p["angle"].abs().max() <= 15 and p["crop"].min() >= 0.8


def test_augmentation_warmup_starts_clean_and_reaches_the_full_transform(ds):
    """train.augment_warmup_epochs=2: epoch 0 sees the evaluation transform, epoch 1 half the
    magnitudes, epoch 2 on exactly the transform without warm-up (same draws, same bytes)."""
    assert [augment_strength(e, 2) for e in (0, 1, 2, 5)] == [0.0, 0.5, 1.0, 1.0]
    assert augment_strength(0, 0) == 1.0
    x, _, idx = gather_uint8(ds.train, torch.arange(16))
    cpu = torch.device("cpu")
    warm, full = BatchTransform(1, 64, cpu, 0, augment_warmup_epochs=2), BatchTransform(1, 64, cpu, 0)
    assert torch.equal(warm.train(x, idx, 0), full.eval(x))
    assert torch.equal(warm.train(x, idx, 2), full.train(x, idx, 2))
    half = warm.train(x, idx, 1)
    assert not torch.equal(half, full.train(x, idx, 1)) and not torch.equal(half, full.eval(x))
    p = augment_params(torch.arange(20000), 0, 1, 0.5)
    assert abs(p["flip"].float().mean().item() - 0.25) < 0.02
    assert (p["angle"].abs().max() <= 7.5 and p["crop"].min() >= 0.9 - 1e-6
            and (p["brightness"] - 1).abs().max() <= 0.1 + 1e-6)
    # the classic pipeline warms up alike: strength 0 is its evaluation transform
    clean, plain = (ClassicDataset(ds.train, channels=1, size=64, train=True, seed=0, strength=0.0),
                    ClassicDataset(ds.train, channels=1, size=64, train=False, seed=0))
    assert torch.equal(clean[3][0], plain[3][0])


def test_same_label_stream_fast_and_classic(ds):
    sampler = ResumableSampler(len(ds.train), 8, 1, 0, seed=0)
    steps = sampler.plan()[:5]
    classic = ClassicDataset(ds.train, channels=1, size=64, train=True, seed=0)
    loader = torch.utils.data.DataLoader(classic, batch_sampler=[s.micro_batches[0].tolist() for s in steps])
    for step, (_, y_classic, i_classic) in zip(steps, loader):
        _, y_fast, i_fast = gather_uint8(ds.train, step.micro_batches[0])
        assert torch.equal(y_fast, y_classic) and torch.equal(i_fast, i_classic)


def test_fast_and_classic_batches_match_statistically(ds):
    pos = torch.arange(len(ds.train))
    x, y, idx = gather_uint8(ds.train, pos)
    fast = BatchTransform(1, 64, torch.device("cpu"), 0).train(x, idx, 0)
    classic = ClassicDataset(ds.train, channels=1, size=64, train=True, seed=0)
    slow = torch.stack([classic[int(i)][0] for i in pos])
    assert fast.shape == slow.shape == (len(pos), 1, 64, 64)
    assert abs(fast.mean().item() - slow.mean().item()) < 0.15
    assert abs(fast.std().item() - slow.std().item()) < 0.15
    # per-image contrast spread also alike
    assert abs(fast.std(dim=(1, 2, 3)).mean().item() - slow.std(dim=(1, 2, 3)).mean().item()) < 0.15


def test_fast_augmentation_is_independent_of_batch_and_world_size(ds):
    t = BatchTransform(1, 64, torch.device("cpu"), 7)
    one = ResumableSampler(len(ds.train), 8, 1, 0, seed=1).plan()[0].micro_batches[0]
    halves = [ResumableSampler(len(ds.train), 4, 2, r, seed=1).plan()[0].micro_batches[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), one)  # world size 2 splits world size 1's batch
    x, _, idx = gather_uint8(ds.train, one)
    whole = t.train(x, idx, epoch=3)
    parts = [t.train(*gather_uint8(ds.train, h)[::2], epoch=3) for h in halves]
    assert torch.allclose(torch.cat(parts), whole, atol=1e-6)
    x2, _, idx2 = gather_uint8(ds.train, one.flip(0))
    assert torch.allclose(t.train(x2, idx2, epoch=3).flip(0), whole, atol=1e-6)


def test_sampler_resume_and_world_size_change_cover_the_epoch_once():
    n, b = 103, 4
    s2 = [ResumableSampler(n, b, 2, r, seed=5, grad_accum=2) for r in (0, 1)]
    assert s2[0].steps_per_epoch() == len(s2[0].plan()) == 7  # 6 x 16 + 7
    first = []
    for step0, step1 in list(zip(s2[0].plan(), s2[1].plan()))[:5]:
        first += torch.cat([step0.real_positions(), step1.real_positions()]).tolist()
        for s in s2:
            s.advance(step0)
    one = ResumableSampler(n, b, 1, 0, seed=5)
    one.load_state_dict(s2[0].state_dict())
    rest = [i for st in one.plan() for i in st.real_positions().tolist()]
    assert sorted(first + rest) == list(range(n))


def test_every_micro_batch_has_the_same_shape_and_fillers_carry_no_weight():
    """Static shapes (a compiled step never recompiles, no BatchNorm batch of one): the epoch's ragged
    end is padded with zero-weight fillers, and the real samples still cover the epoch once."""
    for n, b, world, accum in ((103, 4, 2, 2), (9, 8, 2, 1), (17, 8, 1, 1), (3, 4, 2, 1)):
        seen = []
        for rank in range(world):
            for step in ResumableSampler(n, b, world, rank, seed=2, grad_accum=accum).plan():
                assert all(len(m) == b for m in step.micro_batches)
                assert [int(m.sum()) for m in step.masks()] == step.real
                seen += step.real_positions().tolist()
        assert sorted(seen) == list(range(n)), (n, b, world)
    last = ResumableSampler(17, 8, 1, 0, seed=2).plan()[-1]
    assert last.real == [1] and last.global_samples == 1  # 17 = 2 x 8 + 1: one real sample, seven fillers


def test_eval_shards_are_unpadded_and_complete():
    for n, w in ((63, 2), (10, 4), (3, 4)):
        shards = [eval_shard(n, w, r) for r in range(w)]
        assert torch.equal(torch.cat(shards), torch.arange(n))
