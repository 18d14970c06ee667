"""Train through `emotion-dist train`'s own entry point several times in this one process and print,
as one JSON line, what torch._dynamo compiled in each run (its counters, cleared between runs, with
dynamo's caches reset so each run starts as a fresh process would).

usage: compile_count.py RUNS_JSON [key=value ...]
RUNS_JSON: [["name", ["key=value", ...]], ...]: each run's overrides, after the common ones.
"""

import json
import sys

import torch
from torch._dynamo.utils import counters

from emotion_dist.commands.train import run_training


def main() -> int:
    runs, base = json.loads(sys.argv[1]), sys.argv[2:]
    report = {}
    for name, overrides in runs:
        torch._dynamo.reset()
        counters.clear()
        rc = run_training(None, [*base, *overrides])
        report[name] = {"rc": rc, "frames": counters["frames"]["ok"], "frames_total": counters["frames"]["total"],
                        "graphs": counters["stats"]["unique_graphs"],
                        "recompiles": sum(counters["recompiles"].values())}
    print("COMPILE " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
