"""Test instrumentation, loaded by every Python process whose PYTHONPATH holds this folder: records
which process on which node opens image files under a watched folder, so a test can count decoders
and generators per node without touching the product. Active only when EMOTION_DIST_TEST_AUDIT
names the record file and EMOTION_DIST_TEST_AUDIT_UNDER the folder; one line per open:
`<host name> <pid> <r|w> <path>` (the host name is the node's, see tests/nodes.py)."""

import os
import sys

_LOG = os.environ.get("EMOTION_DIST_TEST_AUDIT")
_UNDER = os.environ.get("EMOTION_DIST_TEST_AUDIT_UNDER")

if _LOG and _UNDER:
    import socket

    _EXTS = (".jpg", ".jpeg", ".png")
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT
    _fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)  # before the hook: not audited
    _node = socket.gethostname()

    def _audit(event, args):
        if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = os.path.abspath(os.fsdecode(args[0]))
        if not path.startswith(_UNDER.rstrip("/") + "/") or not path.lower().endswith(_EXTS):
            return
        mode, flags = args[1], args[2]
        write = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
        os.write(_fd, f"{_node} {os.getpid()} {'w' if write else 'r'} {path}\n".encode())

    sys.addaudithook(_audit)
