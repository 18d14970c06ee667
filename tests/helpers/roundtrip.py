"""Run under torchrun or python: for each group of config overrides (groups separated by `::`),
build the trainer, resume from run.resume, gather the full state again and compare every tensor
with the file (rank 0). One process group serves every group: the checks share one start-up."""

import sys

import torch

from emotion_dist.distributed import process_group
from emotion_dist.distributed.env_settings import resolve_config
from emotion_dist.modelio import load_checkpoint
from emotion_dist.training.build import build_trainer


def override_groups(argv: list[str]) -> list[list[str]]:
    groups = [[]]
    for arg in argv:
        if arg == "::":
            groups.append([])
        else:
            groups[-1].append(arg)
    return [g for g in groups if g]


def check_round_trip(cfg, env) -> None:
    trainer = build_trainer(cfg, env)
    trainer.resume()
    model_sd, optim_sd = trainer.strategy.full_state_dict(trainer.model, trainer.optimizer)
    ema_sd = None
    if trainer.ema:
        with trainer.ema.swapped():
            ema_sd = trainer.strategy.full_model_state_dict(trainer.model)
    if env.is_main:
        saved = load_checkpoint(cfg.run.resume)
        for k, v in saved["model_state_dict"].items():
            assert torch.equal(model_sd[k], v), k
        if "ema_state_dict" in saved:
            assert trainer.ema.updates == saved["ema_updates"] > 0
            for k, v in saved["ema_state_dict"].items():
                assert torch.equal(ema_sd[k], v), ("ema", k)
            assert any(not torch.equal(v, saved["model_state_dict"][k]) for k, v in saved["ema_state_dict"].items()
                       if v.is_floating_point()), "the EMA is a copy of the weights"
        n = 0
        for name, st in saved["optimizer_state_dict"]["state"].items():
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(optim_sd["state"][name][key].cpu(), st[key]), (name, key)
                n += 1
        assert len(saved["optimizer_state_dict"]["state"]) == sum(1 for _ in trainer.model.parameters()) > 100
        ema = " with EMA" if ema_sd else ""
        print(f"ROUNDTRIP OK {cfg.dist.strategy} world={env.world_size} "
              f"from {saved['strategy']} world={saved['world_size']}{ema} tensors={n}", flush=True)
    trainer.close()


def main() -> int:
    configs = [resolve_config(None, group)[0] for group in override_groups(sys.argv[1:])]
    env = process_group.init_distributed(configs[0], process_group.detect_launch())
    for cfg in configs:
        check_round_trip(cfg, env)
    process_group.close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
