"""Hold the run-directory lease in a process of its own, as a training job's rank 0 would.

usage: lease_holder.py RUN_DIR HEARTBEAT_S STALE_S. Job ids come from the environment (SLURM_*,
TORCHELASTIC_*). Prints `held PID TOKEN` once it holds the lease, then waits for stdin to close
and releases it (printing `lost: ...` first if another job took it over). Refused, it prints the
one line `error: ...` on stderr and exits 2, as `emotion-dist train` does."""

import logging
import os
import sys

from emotion_dist.distributed.lease import RunDirBusy, RunDirLease


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    run_dir, heartbeat_s, stale_s = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    lease = RunDirLease(run_dir, interval_s=heartbeat_s, stale_after_s=stale_s)
    try:
        lease.acquire()
    except RunDirBusy as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"held {os.getpid()} {lease.me.token}", flush=True)
    with lease:
        sys.stdin.read()
    if lease.lost:
        print(f"lost: {lease.lost}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
