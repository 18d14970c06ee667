"""What the default recipe's wall time would be on a quiet machine, from the pieces it is made of.

    python tools/recipe/recipe_time.py --batch 32 64 --repeats 40

On a shared machine a whole run's wall time mostly measures the neighbours. This times the pieces
many times over and keeps the fastest repetition of each (contention only ever adds time): one
training step (fast-pipeline augmentation + forward + backward + AdamW) per batch size, one
evaluation forward, and drawing synthetic faces. `--estimate` then adds them up for a run:
drawing train + test, E epochs of training and validation, the final test pass. What it leaves out
(process start, imports, decoding the JPEGs, checkpoint writes, plots) is measured by comparing
with a real run on a quiet machine; README.md here says by how much.

Not imported by the package: a tool of the recipe's own.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def fastest(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--estimate", nargs=4, type=int, metavar=("TRAIN", "TEST", "EPOCHS", "BATCH"),
                   help="also estimate a run: images drawn for train and test, epochs, batch size")
    p.add_argument("--val-fraction", type=float, default=0.1)
    args = p.parse_args(argv)

    import numpy as np
    import torch
    import torch.nn.functional as F

    from emotion_dist.data.augment import BatchTransform
    from emotion_dist.data.readers.synthetic import draw_face
    from emotion_dist.model import build_model

    torch.manual_seed(0)
    model = build_model(1, 7, args.image_size).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    transform = BatchTransform(1, args.image_size, torch.device("cpu"), 0)
    out = {"threads": torch.get_num_threads(), "train_s_per_image": {}}
    for b in args.batch:
        x_u8 = torch.randint(0, 256, (b, 1, 48, 48), dtype=torch.uint8)
        y = torch.randint(0, 7, (b,))
        idx = torch.arange(b)

        def step():
            x = transform.train(x_u8, idx, 0).contiguous(memory_format=torch.channels_last)  # noqa: B023
            F.cross_entropy(model(x), y, label_smoothing=0.1).backward()  # noqa: B023
            opt.step()
            opt.zero_grad(set_to_none=True)

        model.train()
        step()  # warm-up
        out["train_s_per_image"][b] = fastest(step, args.repeats) / b
    model.eval()
    xe = transform.eval(torch.randint(0, 256, (256, 1, 48, 48), dtype=torch.uint8))
    with torch.no_grad():
        out["eval_s_per_image"] = fastest(lambda: model(xe), max(3, args.repeats // 5)) / 256
    rng = np.random.default_rng(0)
    out["draw_s_per_image"] = fastest(  # as synthetic.generate writes them
        lambda: draw_face(int(rng.integers(7)), rng).save(io.BytesIO(), "JPEG", quality=92), args.repeats * 5)
    if args.estimate:
        n_train, n_test, epochs, batch = args.estimate
        per = out["train_s_per_image"].get(batch)
        if per is None:
            p.error(f"--estimate batch {batch} is not among --batch {args.batch}")
        fit = round(n_train * (1 - args.val_fraction))
        val = n_train - fit
        out["estimate"] = {
            "draw_s": (n_train + n_test) * out["draw_s_per_image"],
            "train_s": epochs * fit * per,
            "val_s": epochs * val * out["eval_s_per_image"],
            "test_s": n_test * out["eval_s_per_image"],
        }
        out["estimate"]["total_s"] = sum(out["estimate"].values())
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
