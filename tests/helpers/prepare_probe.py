"""One rank of a real multi-process run of prepare.py's protocol, for tests/test_prepare.py.

    prepare_probe.py SCENARIO [key=value ...]

Scenarios: scope (print the topology and scope, then prepare a marker once), build (decode the
folder given by PROBE_DATA together, as training does), die (the preparer kills itself), slow (the
preparer takes PROBE_SLOW_S seconds). Errors end as the commands end them: one line, exit 2 (user
error), 1 (aborted) or 0 (stop signal).
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from emotion_dist.config import load_config  # noqa: E402
from emotion_dist.data import prepare  # noqa: E402
from emotion_dist.distributed import process_group  # noqa: E402
from emotion_dist.errors import ConfigError, Interrupted, TrainingAborted  # noqa: E402
from emotion_dist.training.loggers import setup_logging  # noqa: E402


def scenario(name: str, cfg, env) -> dict:
    prep = prepare.Preparation.start(cfg, env)
    topo = prep.topo
    out = {"rank": topo.rank, "node": topo.node, "scope": prep.scope, "topology": topo.describe()}
    cache_dir = Path(cfg.run.cache_dir)
    if name == "scope":
        def make_marker():
            marker = cache_dir / "marker"
            if marker.exists():
                return "found"
            marker.write_text(str(topo.rank))
            return "made"

        out["marker"] = prep.once("the marker", make_marker)
    elif name == "build":
        from emotion_dist.data.datasets import decode_all
        from emotion_dist.data.readers.folder import scan

        _, files, labels = scan(Path(os.environ["PROBE_DATA"]))
        c = prep.once("the decoded images", lambda: decode_all(files, labels, 1, cache_dir / "decoded"), together=True)
        out["shape"] = list(c.images.shape)
    elif name == "die":
        def die():
            if topo.rank == int(os.environ.get("PROBE_VICTIM", "0")):
                os.kill(os.getpid(), signal.SIGKILL)
            return "alive"

        out["result"] = prep.once("the doomed data", die)
    elif name == "slow":
        out["result"] = prep.once("the slow data", lambda: time.sleep(float(os.environ["PROBE_SLOW_S"])) or "slept")
    return out


def main() -> int:
    prepare.STALE_S = float(os.environ.get("PROBE_STALE_S", prepare.STALE_S))
    info = process_group.detect_launch()
    overrides = sys.argv[2:]
    if "PROBE_CACHE_DIRS" in os.environ:  # a run.cache_dir of its own per rank ("node-local")
        overrides.append(f"run.cache_dir={os.environ['PROBE_CACHE_DIRS'].split('|')[info.rank]}")
    cfg, _ = load_config(None, overrides)
    env = process_group.init_distributed(cfg, info)
    setup_logging(env.rank)
    ok = False
    try:
        print(json.dumps(scenario(sys.argv[1], cfg, env)), flush=True)
        ok = True
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingAborted as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except Interrupted as e:
        print(f"stopped by {e.signame}", file=sys.stderr, flush=True)
        return 0
    finally:
        process_group.close_distributed(clean=ok)


if __name__ == "__main__":
    sys.exit(main())
