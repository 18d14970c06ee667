"""The training loop: fit -> train_one_epoch -> train_step. Everything it works with is built by
`build.build_trainer`; state is saved and resumed through the Checkpointer the parts registered with;
evaluation and plots are `validation.py`. Decisions that end or change the loop (a stop signal, a
non-finite step, a failed checkpoint write) are agreed by all ranks at step boundaries."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from emotion_dist.config import Config, config_diff, config_from_dict
from emotion_dist.data.datasets import Datasets, write_data_report
from emotion_dist.data.loader import Batch, BatchSource
from emotion_dist.data.sampler import ResumableSampler, Step
from emotion_dist.distributed import interrupts, liveness, process_group
from emotion_dist.distributed.lease import RunDirLease
from emotion_dist.errors import Interrupted, TrainingAborted
from emotion_dist.modelio import CheckpointMeta, inference_weights, load_checkpoint
from emotion_dist.training.amp import autocast
from emotion_dist.training.checkpoint import Checkpointer
from emotion_dist.training.diagnostics import SampleIdLog, entered_phase, inject_fault
from emotion_dist.training.ema import ModelEMA
from emotion_dist.training.loggers import RunLogger
from emotion_dist.training.losses import Criterion
from emotion_dist.training.metrics import plot_confusion
from emotion_dist.training.pictures import VAL_ERRORS, save_epoch_plots, save_train_batch, save_val_errors
from emotion_dist.training.schedule import ProgressLR
from emotion_dist.training.state import EpochSums, TrainProgress
from emotion_dist.training.strategy import Strategy
from emotion_dist.training.validation import Evaluator

log = logging.getLogger("emotion_dist")


def per_class_record(result: dict, *, epoch: int, step: int) -> dict:
    """Validation precision, recall and F1 of each class, as one record (TensorBoard, W&B, metrics.jsonl)."""
    figures = {f"{name}_{k}": v for name, m in result["per_class"].items()
               for k, v in m.items() if k in ("precision", "recall", "f1")}
    return {"type": "val_classes", "epoch": epoch, "step": step, **figures}


def is_collective_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    text = str(e).lower()  # gloo says "Timed out ...", "Application timeout caused pair closure", ...
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        w in text for w in ("timed out", "timeout", "connection closed", "connection reset", "nccl", "gloo"))


@dataclass(kw_only=True)
class Trainer:
    """Everything the loop works with, built by keyword in build.build_trainer."""

    cfg: Config
    env: process_group.DistEnv
    ds: Datasets
    model: nn.Module
    strategy: Strategy
    optimizer: torch.optim.Optimizer
    scheduler: ProgressLR
    scaler: torch.amp.GradScaler
    ema: Optional[ModelEMA]
    sampler: ResumableSampler
    batches: BatchSource  # the epoch's training batches
    evaluator: Evaluator  # validation and the test pass
    criterion: Criterion
    checkpointer: Checkpointer
    logger: RunLogger
    meta: CheckpointMeta
    progress: TrainProgress
    epoch_sums: EpochSums  # the epoch's running loss/correct/samples, checkpointed
    lease: Optional[RunDirLease] = None  # rank 0's hold on run.dir; losing it stops every rank
    phase: str = "start-up"  # what the ranks were doing together, for the message when a peer is lost
    stop_agreed: bool = False  # the ranks agreed on a stop signal at a step boundary

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        try:
            return self._fit()
        except RuntimeError as e:
            if not is_collective_failure(e):
                raise
            topo = self.env.topology
            lost = topo.lost(str(e), liveness.silent_ranks()) if topo is not None else None
            who = f"lost {lost}: it died or its node went down" if lost else "a peer rank is stuck or died"
            raise TrainingAborted(
                f"rank {self.env.rank}: collective failed during {self.phase} at step {self.progress.global_step + 1} "
                f"({str(e).strip().splitlines()[0][:160]}); {who} (dist.timeout_s={self.cfg.dist.timeout_s:g})"
            ) from e

    def _fit(self) -> dict:
        self.resume()
        p, t = self.progress, self.cfg.train
        self.logger.start(p.global_step)  # sinks that keep a stream (TensorBoard) drop what came after it
        if self.env.is_main:
            self.logger.best_effort(write_data_report, self.ds, Path(self.cfg.run.dir) / "data_report.json")
        while p.epoch < t.epochs and not p.out_of_patience(t.patience):
            start = time.perf_counter()
            train_stats = self.train_one_epoch()
            if train_stats is None and self.stop_agreed:  # stopped at a step boundary; state saved
                return {"stopped": True, "global_step": p.global_step}
            if train_stats is None:  # train.max_steps mid-epoch; state saved
                break
            try:
                val, cm = self.validate()
            except Interrupted as e:  # the epoch's training is saved; the resumed run redoes validation
                return self.stopped(e, "validation", save=True)
            row = {"epoch": p.epoch + 1, "step": p.global_step, **train_stats, "val_loss": val["loss"],
                   "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
                   "lr": self.scheduler.last_lr(), "time_s": round(time.perf_counter() - start, 2)}
            is_best = p.end_epoch(row, val["macro_f1"])
            self.sampler.set_epoch(p.epoch)
            self.logger.log({"type": "epoch", **row})
            self.logger.log(per_class_record(val, epoch=p.epoch, step=p.global_step))
            self.save(is_best)
            if self.env.is_main and self.cfg.log.pictures:
                self.epoch_pictures(val, cm, is_best)
            if p.max_steps_reached(t.max_steps):
                break
        if p.out_of_patience(t.patience):
            self.logger.line(f"early stop after epoch {p.epoch}: no better validation macro-F1 in "
                             f"{p.epoch - p.best_epoch} epochs (best {p.best_metric:.4f} at epoch "
                             f"{p.best_epoch}; train.patience={t.patience})")
        return self.finish()

    def train_one_epoch(self) -> Optional[dict]:
        """One epoch from wherever the sampler stands; None when it ends mid-epoch (a stop signal, or
        train.max_steps), with the state saved."""
        p, env = self.progress, self.env
        self.sampler.set_epoch(p.epoch)
        self.model.train()
        steps = self.sampler.plan()
        total = self.sampler.steps_per_epoch()
        self.logger.epoch_start(p.epoch, self.cfg.train.epochs, total, total - len(steps))
        if self.sampler.consumed == 0:  # a new epoch; mid-epoch, the sums resumed with the checkpoint
            self.epoch_sums.reset()
        sums = self.epoch_sums.sums  # loss, correct, samples: updated in place, saved with every checkpoint
        window_t, window_n = time.perf_counter(), 0
        for i, (step, micro) in enumerate(self.batches.epoch(steps, p.epoch), start=total - len(steps) + 1):
            if p.global_step == 0 and env.is_main and self.cfg.log.pictures:
                save_train_batch(self.logger, self.cfg.run.dir, x=micro[0][0], y=micro[0][1],
                                 transform=self.batches.transform, classes=self.ds.classes)
            self.phase = "the training step (forward/backward, gradient all-reduce)"
            self.scheduler.update(p.epoch + self.sampler.consumed / self.sampler.n)
            loss, correct, stop, applied = self.train_step(step, micro, inject_fault(env.rank, p.global_step + 1))
            sums += torch.stack([loss, correct.double(), torch.tensor(float(sum(step.real)), device=env.device)])
            self.sampler.advance(step)
            p.end_step(applied)
            self._after_step(step, applied)
            window_n += step.global_samples
            if p.global_step % self.cfg.log.every_steps == 0 or i == total:
                now = time.perf_counter()
                p.last_loss = self.epoch_sums.running_loss()  # the one host sync per log interval
                self.logger.step(i, total, {"type": "step", "step": p.global_step, "loss": p.last_loss,
                                            "lr": self.scheduler.last_lr(), "img_per_s": window_n / (now - window_t)})
                window_t, window_n = now, 0
            at_max = p.max_steps_reached(self.cfg.train.max_steps) and i < total
            if stop or at_max:
                p.last_loss = self.epoch_sums.running_loss()
                self.logger.stop_progress()
                if stop:
                    signame = interrupts.requested() or "a signal on another rank"
                    self.logger.line(f"stop requested ({signame}): "
                                     f"saving at step {p.global_step} (mid-epoch) and exiting")
                else:
                    self.logger.line(f"train.max_steps={self.cfg.train.max_steps} reached: saving at step "
                                     f"{p.global_step} (mid-epoch)")
                self.save()
                self.stop_agreed = stop
                return None
            if self.checkpointer.due(p.global_step):
                self.save()
        total_sums = process_group.all_reduce_sum(sums.clone())
        n = max(float(total_sums[2]), 1.0)
        return {"train_loss": float(total_sums[0]) / n, "train_accuracy": float(total_sums[1]) / n}

    def train_step(self, step: Step, micro: list[Batch], poison: bool = False):
        """Forward/backward over the micro-batches, then one agreement among all ranks (the step's only
        host sync). Returns (loss sum, correct count) as device tensors, (stop requested anywhere,
        step applied everywhere) as bools."""
        t, env = self.cfg.train, self.env
        scale = env.world_size / step.global_samples  # DDP averages over ranks: this makes it the global mean
        loss_sum = torch.zeros((), device=env.device)
        correct = torch.zeros((), dtype=torch.int64, device=env.device)
        for j, (x, y, mask) in enumerate(micro):
            if t.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.strategy.no_sync(self.model, last_micro_batch=j == len(micro) - 1):
                with autocast(env.device, t.precision):
                    logits = self.model(x)
                loss = self.criterion(logits.float(), y, mask)
                if poison:
                    loss = loss * float("nan")
                self.scaler.scale(loss * scale).backward()
            loss_sum += loss.detach()
            hard = y.argmax(1) if y.is_floating_point() else y  # soft targets: scored against their top class
            correct += ((logits.detach().argmax(1) == hard) & mask).sum()
        if t.precision == "fp16":  # GradScaler skips non-finite steps itself and adapts its scale
            self.scaler.unscale_(self.optimizer)
            if t.clip_grad_norm:
                self.strategy.clip_grad_norm(self.model, t.clip_grad_norm)
            local_bad = torch.zeros((), dtype=torch.bool, device=env.device)
        else:
            norm = self.strategy.clip_grad_norm(self.model, t.clip_grad_norm or float("inf"))
            local_bad = ~(torch.isfinite(norm) & torch.isfinite(loss_sum))
        self.phase = "the step-boundary agreement (all-reduce of stop/non-finite flags)"
        lost = self.lease is not None and self.lease.lost is not None
        stop, bad, lost = process_group.agree_any([interrupts.requested() is not None, local_bad, lost], env.device)
        if lost:
            raise TrainingAborted(self.lease.lost if self.lease else "rank 0 lost the lease on run.dir (another job "
                                  "took the run directory over); stopping without writing")
        if t.precision == "fp16":
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif not bad:  # decided together: no rank steps while another skips
            self.optimizer.step()
        if self.ema and not bad:
            self.ema.update()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.nan_to_num(loss_sum.double(), nan=0.0, posinf=0.0, neginf=0.0), correct, stop, not bad

    def _after_step(self, step: Step, applied: bool) -> None:
        p = self.progress
        if self.cfg.log.sample_ids:
            SampleIdLog(self.cfg.run.dir, self.env.rank, self.ds.train.index).record(p.epoch, p.global_step,
                                                                                    step.real_positions())
        if applied:
            return
        self.logger.line(f"non-finite loss or gradient at step {p.global_step}: optimizer step skipped on all ranks "
                         f"({p.bad_steps} in a row, {p.skipped_steps} in total)")
        self.logger.log({"type": "bad_step", "step": p.global_step, "consecutive": p.bad_steps})
        if p.too_many_bad_steps(self.cfg.train.max_bad_steps):
            raise TrainingAborted(
                f"stopping: {p.bad_steps} consecutive non-finite steps up to step {p.global_step}; "
                f"last good checkpoint: {self.checkpointer.last_good or 'none'} (lower train.lr or use "
                f"train.precision=fp32)")

    # ------------------------------------------------------------------ evaluation
    def validate(self) -> tuple[dict, torch.Tensor]:
        """The validation split, on the EMA of the weights when there is one (it picks best.pt)."""
        self.phase = "validation (all-reduce of the confusion matrix)"
        entered_phase("validation")
        with self.ema.swapped() if self.ema else contextlib.nullcontext():
            return self.evaluator.evaluate(self.model, self.ds.val, mistakes=VAL_ERRORS)

    def epoch_pictures(self, val: dict, cm: torch.Tensor, is_best: bool) -> None:
        """Rank 0: the curves and confusion matrix each epoch, the mistakes when the best epoch changes."""
        p, run_dir = self.progress, self.cfg.run.dir
        save_epoch_plots(self.logger, run_dir, history=p.history, cm=cm, classes=self.ds.classes,
                         best_epoch=p.best_epoch)
        if is_best:
            save_val_errors(self.logger, run_dir, split=self.ds.val, mistakes=val["mistakes"],
                            classes=self.ds.classes, epoch=p.epoch)

    def stopped(self, e: Interrupted, phase: str, save: bool) -> dict:
        """A stop signal during `phase` (validation, the test pass): the training state is saved (or
        was, at the last epoch end), and the resumed or requeued run redoes that phase."""
        self.logger.stop_progress()
        self.logger.line(f"stop requested ({e.signame}) during {phase}: "
                         f"{'saving at step ' + str(self.progress.global_step) + ' and ' if save else ''}exiting; "
                         f"the resumed run redoes the {phase}")
        if save:
            self.save()
        return {"stopped": True, "global_step": self.progress.global_step, "stopped_in": phase}

    def finish(self) -> dict:
        p, files = self.progress, self.checkpointer.files
        result = {"stopped": False, "global_step": p.global_step, "best_val_macro_f1": p.best_metric,
                  "best_epoch": p.best_epoch, "early_stopped": p.out_of_patience(self.cfg.train.patience),
                  "max_steps_reached": p.max_steps_reached(self.cfg.train.max_steps)}
        if p.history:
            result["val_accuracy"] = p.history[-1]["val_accuracy"]
        best = f"{self.cfg.run.dir}/checkpoints/best.pt"
        has_best = process_group.broadcast_object(files is not None and files.best.is_file())
        if p.test_recorded:
            self.logger.line(f"already finished at epoch {p.epoch} (test pass recorded); nothing to do")
        elif self.cfg.train.eval_test and self.ds.test is None:
            self.logger.line(f"no test pass: {self.ds.root} has no test split (a test/ or val/ folder beside "
                             f"train/); train.eval_test=false says so without this line")
        elif self.cfg.train.eval_test and has_best:
            self.phase = "the test pass on best.pt"
            entered_phase("test pass")
            try:
                result.update(self.final_test_pass(best))
            except Interrupted as e:  # the training state at the last epoch end is intact
                return self.stopped(e, "test pass", save=False)
        self.logger.image("curves", f"{self.cfg.run.dir}/curves.png")
        if self.cfg.log.wandb_artifact and self.env.is_main:
            meta = {**result, "classes": self.ds.classes, "image_size": self.cfg.data.image_size,
                    "ema": self.ema is not None}
            self.logger.artifact(best, ["best", f"epoch-{p.best_epoch}"], meta)
        self.logger.finish(result)
        return result

    def final_test_pass(self, best: str) -> dict:
        """best.pt on the test split, once; recorded in the log and in last.pt, so a resumed finished
        run does not read the test split again."""
        p, tta = self.progress, self.cfg.train.test_tta
        test, cm = self.evaluator.test_pass(self.model, inference_weights(load_checkpoint(best)), self.ds.test, tta=tta)
        self.logger.log({"type": "test", "step": p.global_step, "checkpoint": "best.pt", "tta": tta,
                         **{k: test[k] for k in ("loss", "accuracy", "macro_f1", "count", "per_class")},
                         "confusion_matrix": cm.cpu().tolist()})  # the model card reads these
        shown = "" if tta == "none" else f", TTA {tta}"
        self.logger.line(f"test (best.pt, epoch {p.best_epoch}{shown}): accuracy {test['accuracy']:.4f}  "
                         f"macro-F1 {test['macro_f1']:.4f}")
        if self.env.is_main:
            png = f"{self.cfg.run.dir}/confusion_test.png"
            self.logger.best_effort(plot_confusion, cm.cpu(), self.ds.classes, png, "test (best.pt)")
            self.logger.image("confusion_test", png)
        p.test_recorded = True
        self.save()  # last.pt says the run is complete
        return {"test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"]}

    # ------------------------------------------------------------------ state
    def save(self, is_best: bool = False) -> None:
        """Collective: gather every registered component to rank 0, which writes atomically."""
        self.phase = "the checkpoint gather"
        error = self.checkpointer.save(self.meta, self.progress.global_step, is_best)
        if error is None:
            return
        if self.env.is_main:
            log.error(error)
        if self.cfg.ckpt.on_error == "stop":
            raise TrainingAborted("stopping: checkpoint write failed (ckpt.on_error=stop); free space or fix "
                                  "permissions, then resume")

    def resume(self) -> None:
        """Load what checkpointer.plan() chose at build time (nothing for a fresh start)."""
        self.phase = "resume"
        found = self.checkpointer.load_planned()
        if found is None:
            return
        path, state = found
        p = self.progress
        saved_on = f"saved on world size {state['world_size']} with {state['strategy']}"
        if p.epoch >= self.cfg.train.epochs or p.out_of_patience(self.cfg.train.patience):
            self.logger.line(f"resumed from {path}: training finished at epoch {p.epoch} ({saved_on}); "
                             f"{'nothing to do' if p.test_recorded else 'running only the test pass'}")
        else:
            self.logger.line(f"resumed from {path}: epoch {p.epoch + 1}, step {p.global_step}, "
                             f"{self.sampler.consumed}/{self.sampler.n} samples of the epoch done ({saved_on})")
        changed = config_diff(config_from_dict(state.get("config", {})), self.cfg)
        if changed:
            self.logger.line("config changed since that checkpoint: " + ", ".join(f"{k} {a!r} -> {b!r}"
                                                                                   for k, a, b in changed))

    def close(self) -> None:
        self.logger.close()
