"""Assemble a Trainer from a validated config and a started process group: data (prepared once,
read everywhere), model and strategy, optimizer and schedule, EMA, sampler, loss, the logger sinks,
and the checkpointer every stateful part registers with. Nothing here trains."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from emotion_dist.config import Config, ConfigError, save_config
from emotion_dist.data.augment import BatchTransform
from emotion_dist.data.datasets import (
    Datasets,
    class_log_prior,
    class_weights,
    dataset_root,
    load_datasets,
    normalization,
)
from emotion_dist.data.labels import remap_head
from emotion_dist.data.loader import BatchSource, place_on_device
from emotion_dist.data.prepare import Preparation
from emotion_dist.data.sampler import BalancedSampler, ResumableSampler
from emotion_dist.distributed import process_group
from emotion_dist.model import build_model
from emotion_dist.modelio import CheckpointMeta, inference_weights, load_checkpoint
from emotion_dist.training.checkpoint import Checkpointer, CheckpointFiles, check_resumable
from emotion_dist.training.ema import ModelEMA
from emotion_dist.training.engine import Trainer
from emotion_dist.training.loggers import build_logger
from emotion_dist.training.losses import Criterion
from emotion_dist.training.schedule import ProgressLR
from emotion_dist.training.state import (
    EMAState,
    EpochSums,
    RngStates,
    StoredUnderKey,
    TrainProgress,
    WeightsAndOptimizer,
)
from emotion_dist.training.strategy import make_strategy
from emotion_dist.training.validation import Evaluator
from emotion_dist.utils.fsutil import ensure_writable_dir

log = logging.getLogger("emotion_dist")


def plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def prepare_data(cfg: Config, env: process_group.DistEnv, check_classes: bool = True) -> Datasets:
    """The data set, prepared (generated, downloaded: one rank; decoded into the cache: the preparing
    node's ranks together) once per node or once per job (prepare.py), then read by every rank.
    Waiting ranks poll the store, never bounded by dist.timeout_s."""
    ensure_writable_dir(Path(cfg.run.cache_dir), "run.cache_dir")
    prep = Preparation.start(cfg, env)
    root = prep.once("the dataset", lambda: dataset_root(cfg))
    return prep.once("the decoded images", lambda: load_datasets(cfg, root, check_classes), together=True)


def init_from(model: torch.nn.Module, path: str, classes: list[str]) -> None:
    """Fine-tuning: load the weights that fit (strict=False, a new head allowed) and say what did not.
    A head trained on other class names or order (FER's 7 -> FER+'s 8) has its rows mapped by emotion."""
    state = load_checkpoint(path)
    sd = inference_weights(state)
    own = model.state_dict()
    if state.get("class_names") and state["class_names"] != classes:
        sd = remap_head(sd, own, src_classes=state["class_names"], dst_classes=classes)
    fitting = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    missing, unexpected = model.load_state_dict(fitting, strict=False)
    shape_mismatch = sorted(k for k in sd if k in own and own[k].shape != sd[k].shape)
    log.info("init_from %s: loaded %d tensors; missing %s; unexpected %s; shape mismatch %s",
             path, len(fitting), missing or "none", unexpected or "none", shape_mismatch or "none")


def build_trainer(cfg: Config, env: process_group.DistEnv, *, ds: Datasets | None = None, notes: list[str] = (),
                  lease=None) -> Trainer:
    """`notes`: where the launcher's or W&B's environment set or lost a value (env_settings), for the
    start line. `lease`: rank 0's hold on run.dir (distributed/lease.py); losing it stops every rank."""
    t = cfg.train
    run_dir = Path(cfg.run.dir)
    if env.is_main:
        ensure_writable_dir(run_dir, "run.dir")
    ds = ds or prepare_data(cfg, env)
    if cfg.data.pipeline == "classic" and ds.train.files and not Path(ds.train.files[0]).is_file():
        raise ConfigError("data.pipeline=classic decodes image files and this data set has none (CSV pixels); "
                          "use data.pipeline=fast")
    strategy = make_strategy(cfg.dist, env)

    torch.manual_seed(t.seed)  # the same initial weights on every rank and world size
    model = build_model(cfg.model.in_channels, len(ds.classes), cfg.data.image_size)
    torch.manual_seed(t.seed + env.rank)  # then per rank
    if cfg.model.init_from:
        init_from(model, cfg.model.init_from, ds.classes)
    if t.compile:  # in place: parameter names (and so checkpoints) stay the same. Once per run: every step
        # and eval batch has one shape (sampler.plan_steps, validation.evaluate), so dynamic=False never recompiles
        mode = {"mode": t.compile_mode} if t.compile_backend == "inductor" else {}
        model.compile(backend=t.compile_backend, dynamic=False, **mode)
    model = strategy.wrap(model, channels_last=t.channels_last)
    strategy.sync_initial_weights(model)
    ema = ModelEMA(model, t.ema_decay) if t.ema_decay > 0 else None

    global_batch = t.batch_size * env.world_size * t.grad_accum
    lr = t.lr * (global_batch / 64 if t.lr_scale == "linear" else 1.0)
    optimizer = strategy.build_optimizer(model, lr, t.weight_decay)
    scheduler = ProgressLR(optimizer, t.warmup_epochs, t.epochs)
    scaler = torch.amp.GradScaler(env.device.type, enabled=t.precision == "fp16")
    sampler = (BalancedSampler(ds.train.targets(), t.batch_size, env.world_size, env.rank, seed=t.seed,
                               grad_accum=t.grad_accum)
               if t.sampler == "balanced" else
               ResumableSampler(len(ds.train), t.batch_size, env.world_size, env.rank, seed=t.seed,
                                grad_accum=t.grad_accum))
    weights = class_weights(ds, t.class_weights).to(env.device) if t.class_weights != "none" else None
    offsets = (t.logit_adjust * class_log_prior(ds)).to(env.device) if t.logit_adjust else None

    files = CheckpointFiles(run_dir, cfg.ckpt.keep) if env.is_main else None
    checkpointer = Checkpointer(files, env, cfg.ckpt.every_steps)
    progress, epoch_sums = TrainProgress(), EpochSums(env)
    checkpointer.register("weights", WeightsAndOptimizer(strategy, model, optimizer))
    if ema is not None:
        checkpointer.register("ema", EMAState(ema, strategy, model))
    checkpointer.register("scheduler", StoredUnderKey("scheduler_state_dict", scheduler))
    checkpointer.register("scaler", StoredUnderKey("scaler_state_dict", scaler))
    checkpointer.register("sampler", StoredUnderKey("sampler", sampler))
    checkpointer.register("progress", progress)
    checkpointer.register("epoch_sums", epoch_sums)
    checkpointer.register("rng", RngStates(env))

    # decided before anything is written to the run directory: another run's folder is refused here
    checkpointer.plan(cfg.run.resume, lambda state, path: check_resumable(
        state, path, classes=ds.classes, channels=ds.channels, image_size=cfg.data.image_size,
        train_images=len(ds.train)))
    mean, std = normalization(ds.channels)
    meta = CheckpointMeta(classes=ds.classes, image_size=cfg.data.image_size, in_channels=ds.channels,
                          normalization={"mean": mean, "std": std}, data_size=int(ds.train.images.shape[-1]),
                          label_mode=ds.label_mode, config=cfg.to_dict(), world_size=env.world_size,
                          num_nodes=env.topology.num_nodes if env.topology else 1, strategy=cfg.dist.strategy,
                          run_id=checkpointer.run_id)
    if env.is_main:
        save_config(cfg, run_dir / "config.yaml")
        log.info(
            "launcher %s | world size %d | backend %s | device %s | precision %s | strategy %s | %s | batch %d per "
            "process x %s x %d accumulation = %d global | data %s (%d train / %d val / %d test, %d classes)%s",
            env.launcher, env.world_size, env.backend, env.device, t.precision, cfg.dist.strategy,
            env.topology.describe() if env.topology else "1 node", t.batch_size,
            plural(env.world_size, "process", "processes"), t.grad_accum, global_batch,
            ds.root, len(ds.train), len(ds.val),
            len(ds.test) if ds.test else 0, len(ds.classes), "".join(f" | {n}" for n in notes),
        )
    transform = BatchTransform(ds.channels, cfg.data.image_size, env.device, t.seed,
                               augment_warmup_epochs=t.augment_warmup_epochs)
    batches = BatchSource(split=ds.train, transform=transform, pipeline=cfg.data.pipeline, channels=ds.channels,
                          image_size=cfg.data.image_size, seed=t.seed, num_workers=cfg.data.num_workers,
                          label_mode=ds.label_mode, resident=place_on_device(ds.train, cfg.data, env.device))
    evaluator = Evaluator(transform=transform, env=env, classes=ds.classes, batch_size=t.batch_size,
                          precision=t.precision, strategy=strategy)
    return Trainer(cfg=cfg, env=env, ds=ds, model=model, strategy=strategy, optimizer=optimizer, scheduler=scheduler,
                   scaler=scaler, ema=ema, sampler=sampler, batches=batches, evaluator=evaluator,
                   criterion=Criterion(t.label_smoothing, weights, offsets), checkpointer=checkpointer,
                   logger=build_logger(run_dir, env.is_main, cfg), meta=meta, progress=progress,
                   epoch_sums=epoch_sums, lease=lease)
