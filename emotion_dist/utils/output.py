"""The output convention every command follows: `--json` prints exactly one JSON document on stdout
and nothing else (human output goes to stderr), `--json-out FILE` writes the same document to a file
(atomically; only over a JSON file emotion-dist can prove it wrote: its digest, utils/fsutil.py).
Each document carries the marker key
`emotion_dist` naming the command that wrote it. (predict and evaluate apply the same convention in
their own modules; predict streams JSON Lines for a video.)"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Optional

MARKER = "emotion_dist"  # top-level key of every JSON document emotion-dist writes


def add_output_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true",
                   help=f"print {what} as one JSON document on stdout and nothing else (human output to stderr)")
    p.add_argument("--json-out", default=None, metavar="FILE", help=f"also write {what} as JSON to FILE")


def check_json_out(args, inputs: Iterable[Path] = (), data: Iterable[tuple[str, Path]] = ()) -> Optional[Path]:
    """Before any work: refuse (one line) a --json-out path that is a folder, an input, inside the
    `data` (see utils/paths.py), or a file emotion-dist cannot prove it wrote."""
    from emotion_dist.utils.fsutil import guard_output, json_written_by_us

    if not getattr(args, "json_out", None):
        return None
    return guard_output(Path(args.json_out), what="the JSON document", suffixes=(".json",), inputs=list(inputs),
                        ours=json_written_by_us, option="--json-out", data=data)


def text_stream(args):
    """Where human-readable output goes: stderr when stdout is reserved for JSON."""
    return sys.stderr if getattr(args, "json", False) else sys.stdout


def strict_json(obj):
    """JSON as jq and every other parser reads it: NaN and infinities become null, paths strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj if obj is None or isinstance(obj, (str, int, float, bool)) else str(obj)


def emit(args, document: dict) -> None:
    """Print (--json) and/or write (--json-out) the command's JSON document."""
    from emotion_dist.utils.fsutil import atomic_write_json, with_proof

    document = with_proof(strict_json(document))  # the proof that a re-run may replace the file
    if getattr(args, "json", False):
        print(json.dumps(document, indent=1, allow_nan=False), flush=True)
    if getattr(args, "json_out", None):
        atomic_write_json(Path(args.json_out), document)


@contextlib.contextmanager
def stdout_to_stderr(active: bool = True):
    """Route everything written to stdout (Python and C level, child processes too) to stderr while
    a long command runs, so that stdout holds only the JSON printed afterwards."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
