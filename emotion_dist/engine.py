"""The trainer: build every piece of training state, train, evaluate, checkpoint, resume."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from . import distributed as D
from .augment import BatchTransform, ClassicDataset, gather_uint8
from .checkpoint import Checkpointer, CheckpointError, inference_weights, load_checkpoint
from .config import Config
from .data import Datasets, Split, class_weights, normalization, write_data_report
from .ema import ModelEMA
from .metrics import confusion_matrix, plot_confusion, plot_curves, summarize
from .model import build_model
from .parallel import (broadcast_buffers, build_optimizer, full_model_state_dict, full_state_dict,
                       load_full_state_dict, reshard, unwrap, wrap_model)
from .report import Reporter
from .sampler import ResumableSampler, eval_shard

log = logging.getLogger("emotion_dist")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (too many bad steps, checkpoint write failure)."""


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[precision])


@torch.no_grad()
def evaluate(model, split: Split, transform: BatchTransform, env: D.DistEnv, num_classes: int,
             batch_size: int, precision: str = "fp32", tta: bool = False) -> tuple[dict, torch.Tensor]:
    """Exact distributed evaluation: unpadded contiguous shards, summed confusion matrix. Every rank
    runs the same number of forwards (FSDP all-gathers inside forward), padding with dummies, with
    rank 0's BatchNorm statistics (those a checkpoint holds)."""
    model.eval()
    broadcast_buffers(model)
    shard = eval_shard(len(split), env.world_size, env.rank)
    n_batches = max(1, math.ceil(math.ceil(len(split) / env.world_size) / batch_size))
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=env.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    for chunk in torch.tensor_split(shard, n_batches):
        real = len(chunk) > 0
        x_u8, y, _ = gather_uint8(split, chunk if real else torch.zeros(1, dtype=torch.int64))
        x = transform.eval(x_u8)
        with autocast(env.device, precision):
            logits = model(x).float()
            if tta:
                logits = (logits.softmax(1) + model(torch.flip(x, dims=[3])).float().softmax(1)).log()
        if real:
            y = y.to(env.device)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            cm += confusion_matrix(logits.argmax(1), y, num_classes)
    reshard(model)
    D.all_reduce_sum(cm)
    D.all_reduce_sum(loss_sum)
    n = int(cm.sum())
    return {"loss": float(loss_sum) / max(n, 1), "count": n}, cm


def inject_fault(rank: int, step: int) -> bool:
    """Test hook for real failures in real processes: EMOTION_DIST_FAULT=RANK:STEP:KIND, KIND one of
    raise | kill (SIGKILL itself) | hang | nan (poison the loss from STEP on) | nan1 (at STEP only).
    EMOTION_DIST_FAULT_ONCE=FILE makes it fire once (the file records that it did)."""
    spec = os.environ.get("EMOTION_DIST_FAULT")
    if not spec:
        return False
    f_rank, f_step, kind = spec.split(":")
    if int(f_rank) != rank or step < int(f_step) or (kind != "nan" and step != int(f_step)):
        return False
    if kind in ("nan", "nan1"):  # nan: from STEP on; nan1: at STEP only
        return True
    once = os.environ.get("EMOTION_DIST_FAULT_ONCE")
    if once and Path(once).exists():
        return False
    if once:
        Path(once).write_text(spec)
    if kind == "raise":
        raise RuntimeError(f"injected fault on rank {rank} at step {step}")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        time.sleep(10**6)
    return False


def is_collective_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    text = str(e).lower()  # gloo says "Timed out ...", "Application timeout caused pair closure", ...
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        w in text for w in ("timed out", "timeout", "connection closed", "connection reset", "nccl", "gloo"))


class Trainer:
    def __init__(self, cfg: Config, env: D.DistEnv, ds: Datasets):
        self.cfg, self.env, self.ds = cfg, env, ds
        t = cfg.train
        self.run_dir = Path(cfg.run.dir)
        self.precision = t.precision
        torch.manual_seed(t.seed)  # the same initial weights on every rank and world size
        model = build_model(cfg.model.in_channels, len(ds.classes), cfg.data.image_size)
        torch.manual_seed(t.seed + env.rank)  # then per rank
        if cfg.model.init_from:
            self._init_from(model, cfg.model.init_from)
        if t.channels_last and cfg.dist.strategy != "fsdp":  # FSDP2 shards contiguous parameters only
            model = model.to(memory_format=torch.channels_last)
        if t.compile:
            model.compile()  # in place: parameter names (and so checkpoints) stay the same
        self.model = wrap_model(model, cfg.dist.strategy, env, cfg.dist.sync_bn)
        self._sync_initial_weights()
        self.ema = ModelEMA(self.model, t.ema_decay) if t.ema_decay > 0 else None
        self.sampler = ResumableSampler(len(ds.train), t.batch_size, env.world_size, env.rank, t.seed, t.grad_accum)
        self.global_batch = t.batch_size * env.world_size * t.grad_accum
        lr = t.lr * (self.global_batch / 64 if t.lr_scale == "linear" else 1.0)
        self.optimizer = build_optimizer(self.model, cfg.dist.strategy, lr, t.weight_decay, env.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: self.lr_factor())
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.precision == "fp16")
        self.loss_weight = class_weights(ds).to(env.device) if t.class_weights == "balanced" else None
        self.transform = BatchTransform(ds.channels, cfg.data.image_size, env.device, t.seed)
        self.ckpt = Checkpointer(self.run_dir, cfg.ckpt.keep)
        self.epoch = 0
        self.global_step = 0
        self.best_metric = -1.0
        self.best_epoch = -1
        self.history: list[dict] = []
        self.bad_steps = 0  # consecutive non-finite steps
        self.skipped_steps = 0
        self.last_loss = float("nan")
        self.last_good_ckpt: Optional[str] = None
        self.stop_requested = False
        self.reporter = Reporter(self.run_dir, env.is_main, cfg.log.wandb, cfg.log.wandb_project, cfg.to_dict())

    # ------------------------------------------------------------------ state
    def lr_factor(self) -> float:
        """Linear warmup then cosine decay, a function of epochs done (fractional), so the schedule
        does not depend on world size or batch size."""
        t = self.cfg.train
        progress = self.sampler.epoch + self.sampler.consumed / max(1, self.sampler.n)
        if t.warmup_epochs > 0 and progress < t.warmup_epochs:
            return max(progress / t.warmup_epochs, 1e-3)
        span = max(t.epochs - t.warmup_epochs, 1e-8)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - t.warmup_epochs) / span)))

    def averaged_weights(self):
        """Validation and best-checkpoint selection see the EMA weights when there is one."""
        return self.ema.swapped() if self.ema else contextlib.nullcontext()

    def state_dict(self, model_sd: dict, optim_sd: dict, rng_states: list, ema_sd: Optional[dict] = None) -> dict:
        mean, std = normalization(self.ds.channels)
        ema = {"ema_state_dict": ema_sd, "ema_updates": self.ema.updates} if self.ema else {}
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model_state_dict": model_sd,
            "optimizer_state_dict": optim_sd,
            **ema,
            "scheduler_state_dict": self.scheduler.state_dict(),
            "scaler_state_dict": self.scaler.state_dict(),
            "loss": self.last_loss,
            "sampler": self.sampler.state_dict(),
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "bad_steps": self.bad_steps,
            "skipped_steps": self.skipped_steps,
            "rng_states": rng_states,
            "world_size": self.env.world_size,
            "strategy": self.cfg.dist.strategy,
            "class_names": self.ds.classes,
            "image_size": self.cfg.data.image_size,
            "data_size": int(self.ds.train.images.shape[-1]),  # decoded size the model was trained from
            "in_channels": self.ds.channels,
            "normalization": {"mean": mean, "std": std},
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["class_names"] != self.ds.classes:
            raise CheckpointError(
                f"checkpoint classes {state['class_names']} differ from the data's {self.ds.classes}; "
                f"use model.init_from=PATH to fine-tune on new classes"
            )
        if state.get("in_channels", self.ds.channels) != self.ds.channels:
            raise CheckpointError(f"checkpoint has in_channels={state['in_channels']}; set model.in_channels to match")
        try:
            load_full_state_dict(self.model, self.optimizer, state["model_state_dict"], state["optimizer_state_dict"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint does not fit this model ({str(e).splitlines()[0][:150]})") from None
        self._load_ema(state)
        self.scheduler.load_state_dict(state["scheduler_state_dict"])
        self.scaler.load_state_dict(state["scaler_state_dict"])
        self.sampler.load_state_dict(state["sampler"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.best_metric, self.best_epoch = state["best_metric"], state["best_epoch"]
        self.history = list(state["history"])
        self.bad_steps, self.skipped_steps = state["bad_steps"], state["skipped_steps"]
        self.last_loss = state["loss"]
        if state["world_size"] == self.env.world_size:
            torch.set_rng_state(state["rng_states"][self.env.rank])

    def _load_ema(self, state: dict) -> None:
        if self.ema is None:
            return
        if "ema_state_dict" not in state:  # EMA switched on for a run saved without one: start it here
            self.ema = ModelEMA(self.model, self.ema.decay)
            return
        with self.ema.swapped():  # loading into the swapped-in model sets the average
            load_full_state_dict(self.model, None, state["ema_state_dict"], None)
        self.ema.updates = state["ema_updates"]

    def _init_from(self, model: torch.nn.Module, path: str) -> None:
        sd = inference_weights(load_checkpoint(path))
        own = model.state_dict()
        fitting = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
        missing, unexpected = model.load_state_dict(fitting, strict=False)
        shape_mismatch = sorted(k for k in sd if k in own and own[k].shape != sd[k].shape)
        log.info("init_from %s: loaded %d tensors; missing %s; unexpected %s; shape mismatch %s",
                 path, len(fitting), missing or "none", unexpected or "none", shape_mismatch or "none")

    def _sync_initial_weights(self) -> None:
        if self.env.world_size > 1 and self.cfg.dist.strategy != "fsdp":
            import torch.distributed as dist

            for t in unwrap(self.model).state_dict().values():
                dist.broadcast(t, src=0)

    # ------------------------------------------------------------------ checkpoints
    def save(self, is_best: bool = False) -> None:
        """Collective: gather the full state to rank 0, which writes it atomically."""
        self.phase = "the checkpoint gather"
        model_sd, optim_sd = full_state_dict(self.model, self.optimizer)
        ema_sd = None
        if self.ema:
            with self.ema.swapped():
                ema_sd = full_model_state_dict(self.model)
        rng = D.gather_objects(torch.get_rng_state())
        error = None
        if self.env.is_main:
            try:
                self.ckpt.save(self.state_dict(model_sd, optim_sd, rng, ema_sd), self.global_step, is_best)
                self.last_good_ckpt = str(self.ckpt.last)
            except OSError as e:
                error = (f"checkpoint write at step {self.global_step} failed ({e.strerror or e}); the previous "
                         f"checkpoint {self.last_good_ckpt or '(none)'} is intact")
        (failed,) = D.agree_any([error is not None], self.env.device)
        if failed:
            if self.env.is_main:
                log.error(error)
            if self.cfg.ckpt.on_error == "stop":
                raise TrainingAborted("stopping: checkpoint write failed (ckpt.on_error=stop); free space or fix permissions, then resume")

    def maybe_resume(self) -> None:
        choice = self.cfg.run.resume
        path, state = None, None
        if choice == "auto":
            found = self.ckpt.newest_loadable() if self.env.is_main else None
            path = D.broadcast_object(str(found[0]) if found else None)
            state = found[1] if found else None  # rank 0 has read it already
        elif choice != "never":
            path = choice
        if path is None:
            return
        state = state or load_checkpoint(path)
        self.load_state_dict(state)
        self.last_good_ckpt = path
        self.reporter.line(
            f"resumed from {path}: epoch {self.epoch + 1}, step {self.global_step}, "
            f"{self.sampler.consumed}/{self.sampler.n} samples of the epoch done "
            f"(saved on world size {state['world_size']} with {state['strategy']})"
        )

    # ------------------------------------------------------------------ training
    def request_stop(self, signum, frame) -> None:
        if self.stop_requested:  # a second signal: the user (or launcher) insists; leave now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.stop_requested = True  # only a flag: the step boundary acts on it

    def fit(self) -> dict:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self.request_stop)
        self.phase = "resume"
        try:
            return self._fit()
        except RuntimeError as e:
            if not is_collective_failure(e):
                raise
            raise TrainingAborted(
                f"rank {self.env.rank}: collective failed during {self.phase} at step {self.global_step + 1} "
                f"({str(e).strip().splitlines()[0][:160]}); a peer rank is stuck or died "
                f"(dist.timeout_s={self.cfg.dist.timeout_s:g})"
            ) from e

    def _fit(self) -> dict:
        self.maybe_resume()
        t = self.cfg.train
        if self.env.is_main:
            self.reporter.best_effort(write_data_report, self.ds, self.run_dir / "data_report.json")
        while self.epoch < t.epochs and not self._out_of_patience():
            start = time.perf_counter()
            train_stats = self.train_one_epoch()
            if train_stats is None:  # stopped at a step boundary; state saved
                return {"stopped": True, "global_step": self.global_step}
            self.phase = "validation (all-reduce of the confusion matrix)"
            with self.averaged_weights():
                val, cm = evaluate(self.model, self.ds.val, self.transform, self.env, len(self.ds.classes),
                                   self.cfg.train.batch_size, self.precision)
            val.update(summarize(cm.cpu(), self.ds.classes))
            self.epoch += 1
            self.sampler.set_epoch(self.epoch)
            row = {"epoch": self.epoch, "step": self.global_step, **train_stats, "val_loss": val["loss"],
                   "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
                   "lr": self.optimizer.param_groups[0]["lr"], "time_s": round(time.perf_counter() - start, 2)}
            self.history.append(row)
            is_best = val["macro_f1"] > self.best_metric
            if is_best:
                self.best_metric, self.best_epoch = val["macro_f1"], self.epoch
            self.reporter.epoch_end(row)
            self.save(is_best)
            if self.env.is_main:
                self.reporter.best_effort(plot_curves, self.history, self.run_dir / "curves.png")
                self.reporter.best_effort(plot_confusion, cm.cpu(), self.ds.classes, self.run_dir / "confusion_val.png", "validation")
            if self._max_steps_reached():
                break
        if self._out_of_patience():
            self.reporter.line(f"early stop after epoch {self.epoch}: no better validation macro-F1 in "
                               f"{self.epoch - self.best_epoch} epochs (best {self.best_metric:.4f} at epoch "
                               f"{self.best_epoch}; train.patience={t.patience})")
        return self.finish()

    def _max_steps_reached(self) -> bool:
        return bool(self.cfg.train.max_steps) and self.global_step >= self.cfg.train.max_steps

    def _out_of_patience(self) -> bool:
        # every rank decides from the same all-reduced validation figures: no rank stops alone
        p = self.cfg.train.patience
        return p > 0 and self.best_epoch > 0 and self.epoch - self.best_epoch >= p

    def finish(self) -> dict:
        result = {"stopped": False, "global_step": self.global_step, "best_val_macro_f1": self.best_metric,
                  "best_epoch": self.best_epoch, "early_stopped": self._out_of_patience()}
        if self.history:
            result["val_accuracy"] = self.history[-1]["val_accuracy"]
        if self.cfg.train.eval_test and self.ds.test is not None and self.ckpt.best.is_file():
            best = load_checkpoint(self.ckpt.best)
            load_full_state_dict(self.model, None, inference_weights(best), None)
            test, cm = evaluate(self.model, self.ds.test, self.transform, self.env, len(self.ds.classes),
                                self.cfg.train.batch_size, self.precision)
            test.update(summarize(cm.cpu(), self.ds.classes))
            result["test_accuracy"], result["test_macro_f1"] = test["accuracy"], test["macro_f1"]
            self.reporter.metrics({"type": "test", "checkpoint": "best.pt", **{k: test[k] for k in ("loss", "accuracy", "macro_f1", "count")}})
            self.reporter.line(f"test (best.pt, epoch {self.best_epoch}): accuracy {test['accuracy']:.4f}  macro-F1 {test['macro_f1']:.4f}")
            if self.env.is_main:
                self.reporter.best_effort(plot_confusion, cm.cpu(), self.ds.classes, self.run_dir / "confusion_test.png", "test (best.pt)")
                self.reporter.image("confusion_test", self.run_dir / "confusion_test.png")
        self.reporter.image("curves", self.run_dir / "curves.png")
        if self.cfg.log.wandb_artifact and self.env.is_main:
            meta = {**result, "classes": self.ds.classes, "image_size": self.cfg.data.image_size,
                    "ema": self.ema is not None}
            self.reporter.artifact(self.ckpt.best, ["best", f"epoch-{self.best_epoch}"], meta)
        return result

    def _batches(self, steps):
        """Per step, the (images, labels) of each micro-batch for this rank."""
        split, epoch = self.ds.train, self.sampler.epoch
        if self.cfg.data.pipeline == "fast":
            for step in steps:
                out = []
                for pos in step.micro_batches:
                    x_u8, y, idx = gather_uint8(split, pos)
                    out.append((self.transform.train(x_u8, idx, epoch), y.to(self.env.device, non_blocking=True)))
                yield step, out
            return
        dataset = ClassicDataset(split, self.ds.channels, self.cfg.data.image_size, True, self.cfg.train.seed)
        dataset.epoch = epoch
        micro = [m.tolist() for s in steps for m in s.micro_batches]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=micro, num_workers=self.cfg.data.num_workers,
                                             pin_memory=self.env.device.type == "cuda")
        it = iter(loader)
        for step in steps:
            out = []
            for _ in step.micro_batches:
                x, y, _ = next(it)
                out.append((x.to(self.env.device, non_blocking=True), y.to(self.env.device, non_blocking=True)))
            yield step, out

    def train_one_epoch(self) -> Optional[dict]:
        t, env = self.cfg.train, self.env
        self.sampler.set_epoch(self.epoch)
        self.model.train()
        steps = self.sampler.plan()
        total = self.sampler.steps_per_epoch()
        done = total - len(steps)
        self.reporter.epoch_start(self.epoch, t.epochs, total, done)
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        correct = torch.zeros((), dtype=torch.int64, device=env.device)
        seen, window_t, window_n = 0, time.perf_counter(), 0
        for i, (step, batches) in enumerate(self._batches(steps), start=done + 1):
            self.phase = "the training step (forward/backward, gradient all-reduce)"
            poison = inject_fault(env.rank, self.global_step + 1)
            stop, applied = self.train_step(step, batches, loss_sum, correct, poison)
            self.sampler.advance(step)
            self.global_step += 1
            if self.cfg.log.sample_ids:
                self._record_sample_ids(step)
            seen += sum(len(y) for _, y in batches)
            window_n += step.global_samples
            if not applied:
                self._bad_step()
            else:
                self.bad_steps = 0
            if self.global_step % self.cfg.log.every_steps == 0 or i == total:
                now = time.perf_counter()
                self.last_loss = float(loss_sum) / max(seen, 1)  # the one host sync per log interval
                self.reporter.step(i, total, self.global_step, self.last_loss,
                                   self.optimizer.param_groups[0]["lr"], window_n / (now - window_t))
                window_t, window_n = now, 0
            at_max = self._max_steps_reached() and i < total
            if stop or at_max:
                self.last_loss = float(loss_sum) / max(seen, 1)
                self.reporter.stop_progress()
                why = "stop requested" if stop else f"train.max_steps={t.max_steps} reached"
                self.reporter.line(f"{why}: saving at step {self.global_step} (mid-epoch) and exiting")
                self.save()
                return None
            if self.cfg.ckpt.every_steps and self.global_step % self.cfg.ckpt.every_steps == 0:
                self.save()
        stats = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), dtype=torch.float64, device=env.device)])
        D.all_reduce_sum(stats)
        n = max(float(stats[2]), 1.0)
        return {"train_loss": float(stats[0]) / n, "train_accuracy": float(stats[1]) / n}

    def _record_sample_ids(self, step) -> None:
        ids = self.ds.train.index[torch.cat(step.micro_batches).numpy()].tolist()
        with open(self.run_dir / f"sample_ids.rank{self.env.rank}.jsonl", "a") as f:
            f.write(json.dumps({"epoch": self.epoch, "step": self.global_step, "ids": ids}) + "\n")

    def train_step(self, step, batches, loss_sum: torch.Tensor, correct: torch.Tensor,
                   poison: bool = False) -> tuple[bool, bool]:
        """Forward/backward over the micro-batches, then one agreement among all ranks (the step's
        only host sync): returns (stop requested anywhere, step applied everywhere)."""
        t, env = self.cfg.train, self.env
        scale = env.world_size / step.global_samples  # DDP averages over ranks: this makes it the global mean
        ddp = hasattr(self.model, "no_sync")
        step_loss = torch.zeros((), device=env.device)
        for j, (x, y) in enumerate(batches):
            if t.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            sync = contextlib.nullcontext() if (not ddp or j == len(batches) - 1) else self.model.no_sync()
            with sync:
                with autocast(env.device, self.precision):
                    logits = self.model(x)
                loss = F.cross_entropy(logits.float(), y, weight=self.loss_weight,
                                       label_smoothing=t.label_smoothing, reduction="sum")
                if poison:
                    loss = loss * float("nan")
                self.scaler.scale(loss * scale).backward()
            step_loss += loss.detach()
            correct += (logits.detach().argmax(1) == y).sum()
        loss_sum += torch.nan_to_num(step_loss.double(), nan=0.0, posinf=0.0, neginf=0.0)
        if self.precision == "fp16":  # GradScaler skips non-finite steps itself and adapts its scale
            self.scaler.unscale_(self.optimizer)
            if t.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_grad_norm)
            local_bad = torch.zeros((), dtype=torch.bool, device=env.device)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_grad_norm or float("inf"))
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
            local_bad = ~(torch.isfinite(norm) & torch.isfinite(step_loss))
        self.phase = "the step-boundary agreement (all-reduce of stop/non-finite flags)"
        stop, bad = D.agree_any([self.stop_requested, local_bad], env.device)
        if self.precision == "fp16":
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif not bad:  # decided together: no rank steps while another skips
            self.optimizer.step()
        if self.ema and not bad:
            self.ema.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return stop, not bad

    def _bad_step(self) -> None:
        self.bad_steps += 1
        self.skipped_steps += 1
        self.reporter.line(f"non-finite loss or gradient at step {self.global_step}: optimizer step skipped on all ranks "
                           f"({self.bad_steps} in a row, {self.skipped_steps} in total)")
        self.reporter.metrics({"type": "bad_step", "step": self.global_step, "consecutive": self.bad_steps})
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            raise TrainingAborted(
                f"stopping: {self.bad_steps} consecutive non-finite steps up to step {self.global_step}; "
                f"last good checkpoint: {self.last_good_ckpt or 'none'} (lower train.lr or use train.precision=fp32)"
            )

    def close(self) -> None:
        self.reporter.close()
