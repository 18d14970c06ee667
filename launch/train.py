"""Entry point for every launcher:
    python launch/train.py --config configs/default.yaml train.epochs=3
    torchrun --nproc_per_node=4 launch/train.py --config configs/fer2013.yaml
    accelerate launch --multi_gpu --num_processes 4 launch/train.py --config configs/fer2013.yaml
    srun python launch/train.py ...   (see slurm/)
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from emotion_dist.cli import main  # noqa: E402


def train() -> int:
    return main(["train", *sys.argv[1:]])


if __name__ == "__main__":
    if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: the agent reports a failing rank's traceback
        from torch.distributed.elastic.multiprocessing.errors import record

        train = record(train)
    sys.exit(train())
