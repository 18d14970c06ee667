"""Real multi-process runs: torchrun and accelerate launch with gloo on CPU."""

import json
import sys
import time

import pytest
from conftest import ROOT, env_for_child, run, torchrun_cmd, train_cmd, without

from emotion_dist.modelio import load_checkpoint

pytestmark = pytest.mark.slow


def _records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_torchrun_two_processes_one_writer(tmp_path, fast_overrides):
    proc = run(torchrun_cmd(2, *fast_overrides, "ckpt.every_steps=4"))
    run_dir = tmp_path / "run"
    assert "launcher torchrun | world size 2 | backend gloo" in proc.stdout
    assert "global" in proc.stdout and "8 per process x 2 processes x 1 accumulation = 16 global" in proc.stdout
    assert len(_records(run_dir, "epoch")) == 2  # logged once, by rank 0
    steps = [r["step"] for r in _records(run_dir, "step")]
    assert steps == sorted(set(steps))
    assert "[rank1]" not in proc.stdout  # only rank 0 reports
    state = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert state["world_size"] == 2 and state["epoch"] == 2 and len(state["rng_states"]) == 2
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))


def test_accelerate_launch_two_processes_on_cpu(tmp_path, fast_overrides):
    # accelerate 1.x's `--cpu` starts several processes only through mpirun; its multi-process
    # launcher (torch.distributed.run underneath) runs on CPU with gloo when no GPU is visible.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "bf16",
           "--main_process_port", "0", str(ROOT / "launch/train.py"),
           *fast_overrides, "train.epochs=1"]
    proc = run(cmd)
    assert "launcher accelerate | world size 2 | backend gloo" in proc.stdout
    assert "precision bf16" in proc.stdout  # ACCELERATE_MIXED_PRECISION honoured when not given
    assert len(_records(tmp_path / "run", "epoch")) == 1


def test_two_ranks_with_sync_bn_equal_one_rank_with_double_batch(tmp_path, fast_overrides):
    """Same global batch, same samples, SyncBatchNorm: the same gradients and weights.

    Checked after k=2 steps on the weights *and* on Adam's first moment (0.1 x the gradient):
    Adam divides by sqrt(v), so over many steps it turns fp32 rounding noise on near-zero
    gradients into +-lr updates; the gradient itself is the sharp test."""
    # a long warmup keeps both steps' lr tiny (as the lr of the schedule's first steps always is):
    # Adam turns fp32 rounding noise on near-zero gradients into +-lr updates of the weights
    base = without(fast_overrides, "run.dir", "train.batch_size") + ["train.warmup_epochs=100"]
    one, two, nosync = tmp_path / "one", tmp_path / "two", tmp_path / "nosync"
    run(train_cmd(*base, "train.batch_size=16", "train.max_steps=2", f"run.dir={one}"))
    run(torchrun_cmd(2, *base, "train.batch_size=8", "dist.sync_bn=true", "train.max_steps=2", f"run.dir={two}"))
    a, b = (load_checkpoint(d / "checkpoints/last.pt") for d in (one, two))
    wa, wb = a["model_state_dict"], b["model_state_dict"]
    assert wa.keys() == wb.keys()
    worst_w = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa if wa[k].is_floating_point())
    ma, mb = a["optimizer_state_dict"]["state"], b["optimizer_state_dict"]["state"]
    worst_m = max((ma[k]["exp_avg"] - mb[k]["exp_avg"]).abs().max().item() for k in ma)
    assert worst_w < 1e-5 and worst_m < 1e-5, (worst_w, worst_m)
    # and the check has teeth: without SyncBatchNorm the per-rank statistics differ
    run(torchrun_cmd(2, *base, "train.batch_size=8", "train.max_steps=2", f"run.dir={nosync}"))
    wc = load_checkpoint(nosync / "checkpoints/last.pt")["model_state_dict"]
    assert max((wa[k].double() - wc[k].double()).abs().max().item() for k in wa if wa[k].is_floating_point()) > 1e-3


def test_distributed_evaluation_equals_single_process(tmp_path, one_epoch_run):
    ckpt = one_epoch_run
    common = ["--checkpoint", str(ckpt), "--split", "test", f"run.cache_dir={tmp_path / 'cache'}"]
    run([sys.executable, "-m", "emotion_dist.cli", "evaluate", *common, "--json-out", str(tmp_path / "one.json")])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "emotion_dist.cli",
         "evaluate", *common, "--json-out", str(tmp_path / "two.json")])
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["count"] == two["count"] == 63 and 63 % 2 == 1  # not divisible by the world size
    assert two["world_size"] == 2
    assert one["confusion_matrix"] == two["confusion_matrix"]
    assert one["accuracy"] == two["accuracy"] and one["macro_f1"] == two["macro_f1"]
    assert abs(one["loss"] - two["loss"]) < 1e-5


def test_early_stop_is_taken_by_every_rank_at_the_same_epoch(tmp_path, fast_overrides):
    """An early stop decided on rank 0 alone would hang the others: here every rank decides from the same
    all-reduced validation figures, so both processes leave the loop together and exit 0."""
    args = without(fast_overrides, "train.epochs")
    args += ["train.epochs=40", "train.patience=1", "train.warmup_epochs=0"]
    proc = run(torchrun_cmd(2, *args), timeout=400)
    rows = _records(tmp_path / "run", "epoch")
    f1 = [r["val_macro_f1"] for r in rows]
    best = max(range(len(f1)), key=lambda i: (f1[i], -i)) + 1  # first epoch with the best score
    assert len(rows) == best + 1 < 40, f1  # stopped exactly `patience` epochs after the last improvement
    assert f"early stop after epoch {best + 1}" in proc.stdout
    again = run(torchrun_cmd(2, *args))  # resumed: nothing left to do
    assert len(_records(tmp_path / "run", "epoch")) == len(rows)
    assert f"already finished at epoch {best + 1}" in again.stdout and "nothing to do" in again.stdout


def test_one_rank_raising_ends_the_whole_job(tmp_path, fast_overrides):
    start = time.monotonic()
    proc = run(torchrun_cmd(2, *fast_overrides, "dist.timeout_s=60"), check=False,
               env=env_for_child(EMOTION_DIST_FAULT="1:3:raise"), timeout=200)
    assert proc.returncode != 0
    assert "injected fault on rank 1 at step 3" in proc.stdout + proc.stderr
    assert time.monotonic() - start < 120
