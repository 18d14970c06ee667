"""Run under torchrun: train a few steps with an EMA, then check that evaluating the swapped-in
average and the live weights on the wrapped (DDP/FSDP2) model matches evaluating plain copies of
them, and that the swap leaves the live weights bit-identical."""

import sys

import torch

from emotion_dist.distributed import process_group
from emotion_dist.distributed.env_settings import resolve_config
from emotion_dist.model import build_model
from emotion_dist.training.build import build_trainer
from emotion_dist.training.validation import Evaluator


def main() -> int:
    cfg, _ = resolve_config(None, sys.argv[1:])
    env = process_group.init_distributed(cfg, process_group.detect_launch())
    trainer = build_trainer(cfg, env)
    trainer.fit()  # stops at train.max_steps, mid-epoch, after at least one validation
    model, ema = trainer.model, trainer.ema
    full_model_state_dict = trainer.strategy.full_model_state_dict
    before = process_group.broadcast_object(full_model_state_dict(model))
    with ema.swapped():
        pass
    after = process_group.broadcast_object(full_model_state_dict(model))
    assert all(torch.equal(before[k], after[k]) for k in before), "the swap changed the live weights"

    def run(m):
        evaluator = Evaluator(transform=trainer.batches.transform, env=env, classes=trainer.ds.classes, batch_size=8,
                              strategy=trainer.strategy if m is model else None)
        res, cm = evaluator.evaluate(m, trainer.ds.val)
        return res["loss"], cm.tolist()

    with ema.swapped():
        got_avg = run(model)
    got_live = run(model)  # FSDP2 must not reuse the root parameters gathered while swapped
    # evaluate gives every rank rank 0's BatchNorm statistics: the reference weights are taken after it
    with ema.swapped():
        avg = process_group.broadcast_object(full_model_state_dict(model))
    live = process_group.broadcast_object(full_model_state_dict(model))
    plain = build_model(cfg.model.in_channels, len(trainer.ds.classes), cfg.data.image_size)
    refs = {}
    for name, sd in (("avg", avg), ("live", live)):
        plain.load_state_dict(sd)
        refs[name] = run(plain.to(env.device))
    assert abs(refs["avg"][0] - refs["live"][0]) > 1e-4, "EMA equals the live weights: the check has no teeth"
    for name, got in (("avg", got_avg), ("live", got_live)):
        assert abs(got[0] - refs[name][0]) < 1e-4 and got[1] == refs[name][1], (name, got[0], refs[name][0])
    if env.is_main:
        print(f"EMA SWAP OK {cfg.dist.strategy} world={env.world_size} "
              f"loss live {got_live[0]:.5f} avg {got_avg[0]:.5f}")
    trainer.close()
    process_group.close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
