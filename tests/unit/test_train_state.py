"""In-process unit tests of the loop's policies (no processes): the LR schedule, early stopping, the
bad-step policy, the checkpoint interval, the component registry, and the package's import graph."""

import math

import pytest
import torch

from emotion_dist.training.checkpoint import Checkpointer
from emotion_dist.training.schedule import MIN_WARMUP_FACTOR, ProgressLR, lr_factor
from emotion_dist.training.state import CheckpointInterval, StoredUnderKey, TrainProgress


def test_lr_schedule_is_warmup_then_cosine_in_epochs():
    assert lr_factor(0.0, 2, 10) == MIN_WARMUP_FACTOR  # never lr 0 at the first step
    assert lr_factor(1.0, 2, 10) == pytest.approx(0.5)
    assert lr_factor(2.0, 2, 10) == pytest.approx(1.0)  # the peak at the end of warmup
    assert lr_factor(6.0, 2, 10) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(10.0, 2, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(12.0, 2, 10) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0
    assert lr_factor(0.0, 0, 10) == 1.0  # no warmup
    xs = [lr_factor(p / 10, 1, 5) for p in range(51)]
    peak = xs.index(max(xs))
    assert (all(a <= b for a, b in zip(xs[:peak], xs[1:peak + 1]))
            and all(a >= b for a, b in zip(xs[peak:], xs[peak + 1:])))


def test_progress_lr_sets_every_group_and_keeps_base_lrs_over_a_resume():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=0.1)
    sched = ProgressLR(opt, warmup_epochs=1, epochs=4)
    sched.update(2.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * lr_factor(2.5, 1, 4)] * 2)
    other = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=0.7)  # e.g. another lr_scale
    resumed = ProgressLR(other, 1, 4)
    resumed.load_state_dict(sched.state_dict())
    assert resumed.base_lrs == [0.1, 0.1] and resumed.last_lr() == pytest.approx(sched.last_lr())


def test_patience_stops_after_n_epochs_without_a_better_metric():
    p = TrainProgress()
    assert p.end_epoch({"epoch": 1}, 0.5) is True and p.best_epoch == 1
    assert p.end_epoch({"epoch": 2}, 0.5) is False  # a tie keeps the older best
    assert not p.out_of_patience(2)
    assert p.end_epoch({"epoch": 3}, 0.4) is False
    assert p.out_of_patience(2) and not p.out_of_patience(3) and not p.out_of_patience(0)
    assert p.end_epoch({"epoch": 4}, 0.9) is True and not p.out_of_patience(2)
    assert [h["epoch"] for h in p.history] == [1, 2, 3, 4] and p.best_metric == 0.9


def test_bad_step_policy_counts_streaks_and_totals():
    p = TrainProgress()
    for applied in (True, False, False, True, False, False, False):
        p.end_step(applied)
    assert p.global_step == 7 and p.skipped_steps == 5 and p.bad_steps == 3
    assert p.too_many_bad_steps(3) and not p.too_many_bad_steps(4)
    p.end_step(True)
    assert p.bad_steps == 0 and p.skipped_steps == 5
    assert p.max_steps_reached(8) and not p.max_steps_reached(9) and not p.max_steps_reached(0)


def test_progress_state_roundtrips():
    p = TrainProgress(epoch=3, global_step=40, best_metric=0.7, best_epoch=2, history=[{"epoch": 1}], bad_steps=1,
                      skipped_steps=2, last_loss=1.5)
    q = TrainProgress()
    q.load_state_dict(p.state_dict())
    assert q == p


def test_checkpoint_interval():
    assert [s for s in range(1, 13) if CheckpointInterval(5).due(s)] == [5, 10]
    assert not any(CheckpointInterval(0).due(s) for s in range(1, 100))


def test_components_own_disjoint_keys():
    class Env:
        rank, world_size, is_main = 0, 1, True

    ck = Checkpointer(None, Env())
    sampler_like = type("S", (), {"state_dict": lambda self: {"n": 3}, "load_state_dict": lambda self, s: None})()
    ck.register("progress", TrainProgress())
    ck.register("sampler", StoredUnderKey("sampler", sampler_like))
    state = ck.state_dict()
    assert state["sampler"] == {"n": 3} and state["global_step"] == 0
    with pytest.raises(ValueError, match="registered twice"):
        ck.register("sampler", StoredUnderKey("sampler", sampler_like))
    ck.register("clash", StoredUnderKey("epoch", sampler_like))
    with pytest.raises(ValueError, match="keys another one owns"):
        ck.state_dict()
    assert math.isnan(TrainProgress().last_loss)


def test_topology_names_the_node_a_collective_error_lost():
    from emotion_dist.distributed.topology import from_identities

    ids = [("a", "n1"), ("a", "n1"), ("b", "n2"), ("b", "n2")]
    addrs = ("127.0.1.1", "127.0.1.1", "127.0.1.2", "127.0.1.2")
    t = from_identities(1, 1, ids, addrs)
    assert t.describe() == "2 nodes (n1, n2) x 2 processes" and t.num_nodes == 2 and t.node == 0
    gloo = "[../gloo/transport/tcp/pair.cc:537] Read error [127.0.1.2]:21378: Connection reset by peer"
    # no rank stopped beating (liveness.py): the address gloo names decides
    assert t.lost(gloo, []) == "node n2 (ranks 2, 3) at 127.0.1.2"
    assert t.lost(gloo.replace("127.0.1.2", "127.0.1.1"), []) is None  # its own node: no one to name
    assert t.lost("Timed out waiting 2000ms for recv operation", []) is None
    one = from_identities(0, 0, ids[:2], addrs[:2])
    assert one.lost(gloo.replace("127.0.1.2", "127.0.1.1"), []) is None  # one node: the address names no rank
    # namespaced nodes all read 127.0.0.1: the silent ranks name the node
    local = "Read error [127.0.0.1]:1234: Connection reset by peer"
    assert t.lost(local, [2, 3]) == "node n2 (ranks 2, 3)"
    assert t.lost(local, [3]) == "rank 3 on node n2"
    assert t.lost(local, None) is None  # the store is gone, but this rank is on its node (node 0)
    assert from_identities(2, 0, ids, addrs).lost(local, None) == "node n1 (ranks 0, 1)"
