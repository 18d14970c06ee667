"""The one rule for every path emotion-dist writes to: never inside the user's data.

An output (run.dir, run.cache_dir, `--out`, `--json-out`, `--csv`, export `--out`, `--save`, ...) may
not lie inside the data, be the data, or contain it. Every command checks each of its outputs with
`check_outside_data` before anything is written. Paths are compared after `Path.resolve()`, so a
symlink or a `..` does not get around the rule.

What counts as the data:
- a folder (an ImageFolder tree, the synthetic set's folder, a folder of photos given to predict):
  the whole tree under it;
- a file (fer2013.csv, the FER+ votes file, a photo or a video given to predict): the file itself,
  so an output may not be it, nor a folder that contains it;
- the folder of a CSV data file counts as data too when it holds nothing but CSV files (a download
  folder `fer2013/` with `fer2013.csv` in it): writing a run there would turn the data set's folder
  into a mixed one. A folder that already holds other things (a home or a project folder with the
  CSV in it) is not the data set's own, and a subfolder of it may take outputs. The entry the output
  itself lies under is not counted, so the answer does not change once the output exists.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Union

from emotion_dist.errors import ConfigError

PathLike = Union[str, os.PathLike]


def _resolved(path: PathLike, named: str) -> Path:
    try:
        return Path(os.path.expanduser(os.fspath(path))).resolve()
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a symlink loop, a name too long
        raise ConfigError(f"{named} is not a usable path ({e}); fix it") from None


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _named(what: str, value: PathLike) -> str:
    """`run.dir=PATH` for a config key, `--out PATH` for a flag, `the input folder PATH` for words."""
    return f"{what}={value}" if "." in what and " " not in what and not what.startswith("-") else f"{what} {value}"


def _csv_folder_is_data(folder: Path, output: Path) -> bool:
    """The folder of a CSV data file holds nothing but CSV files (not counting the entry `output`
    lies under)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return False
    branch = output.relative_to(folder).parts[0] if output != folder else None
    return all(e.name == branch or (e.suffix.lower() == ".csv" and e.is_file()) for e in entries)


def data_paths(root: Optional[PathLike], *extra_files: Optional[PathLike]) -> list[tuple[str, Path]]:
    """(what it is, path) for a config's data: data.root and its side files (data.ferplus)."""
    found = [("data.root", root)] + [("data.ferplus", f) for f in extra_files]
    return [(key, Path(p)) for key, p in found if p]


def check_outside_data(output: Optional[PathLike], data: Iterable[tuple[str, PathLike]], *, option: str,
                       fix: Optional[str] = None) -> None:
    """Refuse (ConfigError: one line, exit 2) an output that lies inside, equals or contains any of
    `data` ((what it is, path) pairs, e.g. ("data.root", "faces/") or ("the input folder", ...)).
    `option` names the output as the user gave it (`run.dir`, `--out`); `fix` says what to do."""
    if output is None or os.fspath(output) in ("", "-"):
        return
    out = _resolved(output, _named(option, output))
    for what, given in data:
        d = _resolved(given, _named(what, given))
        if out == d:
            how = "is"
        elif _inside(out, d):
            how = "lies inside"
        elif _inside(d, out):
            how = "contains"
        elif (d.suffix.lower() == ".csv" and d.is_file() and _inside(out, d.parent)
              and _csv_folder_is_data(d.parent, out)):
            how, what, given = ("lies inside", f"the folder of {_named(what, given)}, which holds only CSV data:",
                                d.parent)
        else:
            continue
        resolved = f" ({out})" if str(out) != os.fspath(output) else ""
        raise ConfigError(f"{_named(option, output)}{resolved} {how} {_named(what, given)}; emotion-dist never writes "
                          f"inside the data: {fix or f'set {option} to a path outside it'}")
