"""Run under torchrun: train one short run per variant of the DDP knobs (dist.bucket_cap_mb,
gradient_as_bucket_view, static_graph, grad_compression) in one process group, each into its own
run directory, and print (rank 0) one JSON line per variant with what DistributedDataParallel
reported it was built with. The test compares the runs' last.pt.

usage: ddp_knobs.py RUN_ROOT VARIANTS_JSON [key=value ...]   VARIANTS_JSON: {"name": ["key=value", ...]}
"""

import json
import sys

from emotion_dist.distributed import process_group
from emotion_dist.distributed.env_settings import resolve_config
from emotion_dist.training.build import build_trainer, prepare_data


def main() -> int:
    root, variants, base = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
    env = ds = None
    for name, overrides in variants.items():
        cfg, _ = resolve_config(None, [*base, *overrides, f"run.dir={root}/{name}"])
        if env is None:
            env = process_group.init_distributed(cfg, process_group.detect_launch())
            ds = prepare_data(cfg, env)
        trainer = build_trainer(cfg, env, ds=ds)
        trainer.fit()
        ddp = trainer.model
        if env.is_main:  # what DDP says it was built with, and how many buckets it made
            print("DDP " + json.dumps({"variant": name, "bucket_cap_bytes": ddp.bucket_bytes_cap,
                                       "gradient_as_bucket_view": ddp.gradient_as_bucket_view,
                                       "static_graph": ddp.static_graph,
                                       "comm_hooks": [h.__qualname__ for h, _ in ddp._comm_hooks],
                                       "buckets": len(ddp.reducer._get_zeros_like_grad_buckets())}), flush=True)
        trainer.close()
    process_group.close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
