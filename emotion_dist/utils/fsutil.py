"""Files emotion-dist writes, and the rule that it never touches a file it did not write.

A leaf module (imports only `errors` and `utils.paths`): atomic writes (temp file, fsync,
`os.replace`), the one temp file name every writer uses (naming its writer, so that a leftover of a
killed process is provably ours and removed at the next start, and nothing else ever is), checks that
a folder can be written before expensive work, the guard every output path goes through (never the
data, never the input, never a folder, never a file of another kind, never a file emotion-dist did
not write), and the digest that proves a JSON document is emotion-dist's own.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from emotion_dist.errors import ConfigError

log = logging.getLogger("emotion_dist")

# the host part of a temp name: letters, digits and '-' only, so that it can never hold the name's '.'
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "localhost"
TEMP_MARKER = "emotion-dist-tmp"
# .NAME.emotion-dist-tmp.HOST.PID.START.TOKEN[.npy|.mp4]: the writer (host, pid, the process's start
# time in clock ticks after boot, which tells a reused pid from its writer) and a random token. The
# suffix is there where a writer picks the format from the name (FFmpeg).
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\." + re.escape(TEMP_MARKER) + r"\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)"
                      r"\.(?P<start>\d+)\.(?P<token>[0-9a-f]{8})(?P<ext>\.npy|\.mp4)?$")
# the names earlier versions gave their temp files (.NAME.tmp.HOST.PID, NAME.tmpPID): a name only, no
# proof of who wrote it, so such files are left where they are (and mentioned once)
_OLD_TEMP_RE = re.compile(r"^\.?.+?\.tmp(?:\.[^./]+\.\d+|\d+)(?:\.npy|\.mp4)?$")
# inside a temp *folder* (a data set being generated): its own name, written before anything else, so
# that a folder is removed only when it says it is that temp folder
TEMP_DIR_OWNER = ".emotion-dist-tmp-owner"
# another host's temp file: we cannot see whether its writer lives, so only when untouched this long
OTHER_HOST_MAX_AGE_S = 7 * 24 * 3600
_said_unproven = False  # the "left alone" line is said once per process


def process_start_time(pid: int) -> Optional[int]:
    """The start time of `pid` (clock ticks after boot, /proc/PID/stat field 22); None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


_own_start: dict[int, int] = {}  # per pid: a forked child has its own


def _writer_id() -> str:
    pid = os.getpid()
    if pid not in _own_start:
        _own_start[pid] = process_start_time(pid) or 0
    return f"{HOST}.{pid}.{_own_start[pid]}"


def temp_path(path: Path) -> Path:
    """The temp file a write of `path` goes through: hidden, next to it (same filesystem, so the
    rename is atomic), named after its writer (host, pid, start time) and a random token, so a later
    start can prove the file is a temp of emotion-dist's and tell whether its writer lives."""
    path = Path(path)
    return path.with_name(f".{path.name}.{TEMP_MARKER}.{_writer_id()}.{secrets.token_hex(4)}")


def make_temp_dir(path: Path) -> Path:
    """A temp folder for `path` (a folder built and then renamed into place), holding its owner
    record first: only a folder that holds it is ever removed as a stale temp."""
    tmp = temp_path(path)
    tmp.mkdir(parents=True)
    claim_temp_dir(tmp)
    return tmp


def claim_temp_dir(tmp: Path) -> None:
    """Mark a folder under a temp name as ours (a finished one moved aside to be removed)."""
    (Path(tmp) / TEMP_DIR_OWNER).write_text(Path(tmp).name)


def release_temp_dir(tmp: Path) -> None:
    """Just before a temp folder is renamed into place: its owner record goes (it is no temp any more)."""
    (Path(tmp) / TEMP_DIR_OWNER).unlink(missing_ok=True)


def _writer_gone(pid: int, start: int) -> bool:
    """On this host: the pid is dead, or now another process (its start time differs)."""
    if not process_alive(pid):
        return True
    now = process_start_time(pid)
    return start != 0 and now is not None and now != start


def _provably_ours(p: Path) -> bool:
    """A plain file with our full temp name, or a folder with that name holding its owner record."""
    if p.is_symlink():
        return False
    if p.is_dir():
        try:
            return (p / TEMP_DIR_OWNER).read_text() == p.name and not (p / TEMP_DIR_OWNER).is_symlink()
        except (OSError, UnicodeDecodeError):
            return False
    return p.is_file()


def is_stale_temp(path: Path, max_age_s: float = OTHER_HOST_MAX_AGE_S) -> bool:
    """A temp file of ours whose writer is gone: on this host, its pid dead or reused; on another
    host, untouched for `max_age_s`."""
    m = _TEMP_RE.match(Path(path).name)
    if not m:
        return False
    if m.group("host") == HOST:
        return _writer_gone(int(m.group("pid")), int(m.group("start")))
    try:
        return time.time() - Path(path).stat().st_mtime > max_age_s
    except FileNotFoundError:
        return False


def remove_stale_temps(folder: Path, everything_ours: bool = False,
                       max_age_s: float = OTHER_HOST_MAX_AGE_S) -> list[Path]:
    """Remove the temp files (and temp folders) that killed emotion-dist writers left in `folder`.
    Only what is provably ours goes: our full temp name (writer, start time, token), a plain file or
    a folder holding its owner record, whose writer is gone (see is_stale_temp). With
    `everything_ours` (a folder only this process writes to, under the run-directory lease) every
    such temp of ours goes, live writer or not. Anything else, whatever its name or age, is left
    alone; names that merely look like temp files are mentioned once per process. Returns what
    was removed."""
    global _said_unproven
    import shutil

    removed, unproven = [], []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in sorted(folder.iterdir()):
        if not _TEMP_RE.match(p.name):
            if _OLD_TEMP_RE.match(p.name):
                unproven.append(p)
            continue
        if not _provably_ours(p):
            unproven.append(p)
            continue
        if everything_ours or is_stale_temp(p, max_age_s):
            try:
                shutil.rmtree(p) if p.is_dir() else p.unlink()  # a temp folder: a data set being generated
                removed.append(p)
            except FileNotFoundError:
                pass
    if unproven and not _said_unproven:
        _said_unproven = True
        log.warning("left %d file(s) alone that look like temp files but that emotion-dist cannot prove it "
                    "wrote, e.g. %s; remove them yourself if they are leftovers", len(unproven), unproven[0])
    return removed


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
        return Path(a).resolve() == Path(b).resolve() or (Path(a).exists()
                                                          and Path(b).exists() and os.path.samefile(a, b))
    except OSError:
        return False


def guard_output(path: Path, *, what: str, suffixes: Iterable[str], inputs: Iterable[Path] = (),
                 ours: Optional[Callable[[Path], bool]] = None, option: str = "--out",
                 data: Iterable[tuple[str, Path]] = ()) -> Path:
    """Check an output path before any work. Refused with one line: a path inside, equal to or
    containing the `data` ((what, path) pairs: see utils/paths.check_outside_data), a folder, one of
    the inputs, a name with another suffix than `suffixes` (a file of another kind), or an existing
    file that `ours` does not recognise as emotion-dist's own output. The parent folder must exist."""
    from emotion_dist.utils.paths import check_outside_data

    path = Path(path)
    suffixes = tuple(suffixes)
    for src in inputs:
        if same_file(path, src):
            raise ConfigError(f"{option} {path} is the input file itself; choose another output name")
    check_outside_data(path, data, option=option)
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file name ending in {' or '.join(suffixes)}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise ConfigError(f"{option} {path} does not end in {' or '.join(suffixes)}; refusing to write {what} "
                          f"under another kind of name")
    if path.exists() and not (ours and ours(path)):
        raise ConfigError(f"{option} {path} exists and was not written by emotion-dist (or was changed since); "
                          f"choose a new name or remove it")
    parent = path.parent
    if not parent.is_dir():  # like a shell redirection: the folder must be there (a typo is not created)
        raise ConfigError(f"{option} {path}: the folder {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{option} {path}: {parent} is not writable")
    return path


# The proof that a JSON document is emotion-dist's own output, unchanged since: a digest of its content
# (canonical JSON, the digest key left out) keyed with a constant of emotion-dist's, stored in the
# document. It is no secret and no signature (the key is right here); what it rules out is the
# accident: a user's JSON file, with an "emotion_dist" key or not, or a report of ours that the user
# has since edited (theirs now), is never taken for ours and overwritten. Simpler than a record in
# a folder of ours, and it travels with the file when the file is copied or moved.
DIGEST_KEY = "emotion_dist_digest"
_DIGEST_HMAC_KEY = b"emotion-dist: a document this program wrote, unchanged"


def content_digest(chunks: Iterable[bytes]) -> str:
    """The keyed digest (see DIGEST_KEY) of some content: how the PNGs and videos emotion-dist
    writes prove they are its own and unchanged."""
    h = hmac.new(_DIGEST_HMAC_KEY, digestmod=hashlib.sha256)
    for chunk in chunks:
        h.update(chunk)
    return "hmac-sha256:" + h.hexdigest()


def file_digest(path: Path) -> str:
    """The keyed digest of a whole file, read in 1 MiB chunks."""
    with open(path, "rb") as f:
        return content_digest(iter(lambda: f.read(1 << 20), b""))


# Files streamed as they are made (JSON Lines and CSV records of a video) have no room for a proof
# inside them that would leave their format as it is: for those emotion-dist keeps a record in a folder
# of its own, one small JSON per output (its resolved path and the digest of its content), written
# after the file is complete. A file is ours when its record names it and its content still matches.
def outputs_record_dir() -> Path:
    """Where those records go: $EMOTION_DIST_STATE_DIR, else $XDG_STATE_HOME/emotion-dist (by default
    ~/.local/state/emotion-dist), in `outputs/`."""
    base = os.environ.get("EMOTION_DIST_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "emotion-dist")
    return Path(base) / "outputs"


def _output_record(path: Path) -> tuple[Path, str]:
    real = str(Path(path).resolve())
    digest = hashlib.sha256(real.encode('utf-8', 'surrogateescape')).hexdigest()
    return outputs_record_dir() / f"{digest[:32]}.json", real


def record_output(path: Path) -> None:
    """Record a finished output as emotion-dist's own. Where the record cannot be written (a
    read-only home), the file is complete all the same; a later run will only refuse to replace it."""
    record, real = _output_record(path)
    try:
        atomic_write_json(record, {"emotion_dist": "output", "path": real, "digest": file_digest(path)})
    except OSError as e:
        log.debug("could not record %s as emotion-dist's own (%s)", path, e)


def recorded_output(path: Path) -> bool:
    """A file emotion-dist recorded as its own (record_output) and nobody changed since."""
    record, real = _output_record(path)
    try:
        rec = json.loads(record.read_text())
        return (isinstance(rec, dict) and rec.get("path") == real
                and hmac.compare_digest(str(rec.get("digest")), file_digest(path)))
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def _json_digest(obj: dict) -> str:
    body = json.dumps({k: v for k, v in obj.items() if k != DIGEST_KEY}, sort_keys=True, separators=(",", ":"))
    return "hmac-sha256:" + hmac.new(_DIGEST_HMAC_KEY, body.encode(), hashlib.sha256).hexdigest()


def with_proof(obj: dict) -> dict:
    """`obj` as JSON reads it back (string keys), with its digest: the document a command prints
    (--json) and writes (--json-out), the same in both places."""
    canonical = json.loads(json.dumps(obj))
    return {**canonical, DIGEST_KEY: _json_digest(canonical)}


def json_written_by_us(path: Path, marker_key: str = "emotion_dist") -> bool:
    """A JSON file emotion-dist wrote and nobody changed since: it carries `marker_key` at its top
    level and a digest that matches its content."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    if not (isinstance(obj, dict) and marker_key in obj and isinstance(obj.get(DIGEST_KEY), str)):
        return False
    try:
        return hmac.compare_digest(obj[DIGEST_KEY], _json_digest(obj))
    except (TypeError, ValueError):
        return False
