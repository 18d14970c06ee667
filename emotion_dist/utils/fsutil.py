"""Files emotion-dist writes, and the rule that it never touches a file it did not write.

A leaf module (imports only `errors`): atomic writes (temp file, fsync, `os.replace`), the one temp
file name every writer uses (so leftovers of a killed process can be recognised and removed at the
next start), checks that a folder can be written before expensive work, and the guard every output
path goes through (never the input, never a folder, never a file of another kind, never a file
emotion-dist did not write).
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from emotion_dist.errors import ConfigError

HOST = socket.gethostname().split(".")[0] or "localhost"
# .NAME.tmp.HOST.PID[.npy|.mp4] (this version; the suffix where a writer picks the format from the
# name) and .NAME.tmpPID / NAME.tmpPID.npy (before): all recognised
_TEMP_RE = re.compile(r"^\.?(?P<name>.+?)\.tmp(?:\.(?P<host>[^./]+)\.(?P<pid>\d+)|(?P<oldpid>\d+))(?P<ext>\.npy|\.mp4)?$")


def temp_path(path: Path) -> Path:
    """The temp file a write of `path` goes through: hidden, next to it (same filesystem, so the
    rename is atomic), and naming host and pid so a later start can tell whether its writer lives."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp.{HOST}.{os.getpid()}")


def disk_error(e: OSError, what: str, fix: str = "free space or point it elsewhere") -> str:
    """One line for a failed write: the reason in words and what to do."""
    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        return f"no space left on device while writing {what}; {fix}"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {what} ({reason}); fix the permissions or {fix.split(' or ')[-1]}"
    return f"writing {what} failed ({reason}); {fix}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never a torn one; a failed write (ENOSPC,
    permissions) leaves the old file as it was and removes the temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))


def atomic_write_json(path: Path, obj, indent: Optional[int] = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def process_alive(pid: int) -> bool:
    """Whether `pid` is a live process in this PID namespace; a zombie (killed, not yet reaped) is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def is_stale_temp(path: Path, max_age_s: float = 24 * 3600) -> bool:
    """A temp file of ours whose writer is gone: on this host with a dead pid, or (another host,
    or a name from before hosts were recorded) untouched for `max_age_s`."""
    m = _TEMP_RE.match(path.name)
    if not m:
        return False
    pid = m.group("pid") or m.group("oldpid")
    if m.group("host") == HOST and not process_alive(int(pid)):
        return True
    try:
        return time.time() - path.stat().st_mtime > max_age_s
    except FileNotFoundError:
        return False


def remove_stale_temps(folder: Path, everything_ours: bool = False, max_age_s: float = 24 * 3600) -> list[Path]:
    """Remove temp files (and temp folders) that killed writers left in `folder`. With
    `everything_ours` (a folder only this process writes to, under the run-directory lease) every
    temp file of ours goes, else only those whose writer is gone. Returns what was removed."""
    import shutil

    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if not _TEMP_RE.match(p.name) or p.is_symlink():
            continue
        if everything_ours or is_stale_temp(p, max_age_s):
            try:
                shutil.rmtree(p) if p.is_dir() else p.unlink()  # a temp folder: a data set being generated
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


def ensure_writable_dir(path: Path, key: str) -> Path:
    """Create `path` if needed and prove it can be written, before any expensive work: a file in
    the way, a read-only mount or a full disk is one line naming the config key."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={path} is a file, not a folder; point {key} at a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = temp_path(path / "write-probe")
        with open(probe, "wb") as f:
            f.write(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{key}={path}: {disk_error(e, 'there', f'set {key} to a writable folder')}") from None
    return path


def same_file(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve() or (Path(a).exists() and Path(b).exists() and os.path.samefile(a, b))
    except OSError:
        return False


def guard_output(path: Path, *, what: str, suffixes: Iterable[str], inputs: Iterable[Path] = (),
                 ours: Optional[Callable[[Path], bool]] = None, option: str = "--out") -> Path:
    """Check an output path before any work. Refused with one line: a folder, one of the inputs,
    a name with another suffix than `suffixes` (a file of another kind), or an existing file that
    `ours` does not recognise as emotion-dist's own output. The parent folder must exist."""
    path = Path(path)
    suffixes = tuple(suffixes)
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file name ending in {' or '.join(suffixes)}")
    for src in inputs:
        if same_file(path, src):
            raise ConfigError(f"{option} {path} is the input file itself; choose another output name")
    if suffixes and path.suffix.lower() not in suffixes:
        raise ConfigError(f"{option} {path} does not end in {' or '.join(suffixes)}; refusing to write {what} "
                          f"under another kind of name")
    if path.exists() and not (ours and ours(path)):
        raise ConfigError(f"{option} {path} exists and was not written by emotion-dist; choose a new name or remove it")
    parent = path.parent
    if not parent.is_dir():  # like a shell redirection: the folder must be there (a typo is not created)
        raise ConfigError(f"{option} {path}: the folder {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{option} {path}: {parent} is not writable")
    return path


def json_written_by_us(path: Path, marker_key: str = "emotion_dist") -> bool:
    """A JSON file emotion-dist wrote carries `marker_key` at its top level."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and marker_key in obj
