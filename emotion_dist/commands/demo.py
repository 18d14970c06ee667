"""`emotion-dist demo`: serve the web demo (inference/demo/app.py) with uvicorn. Binds 127.0.0.1
unless --host says otherwise, and the start line says who can reach it. The port is bound here
before uvicorn starts, so a port in use is one line (exit 2), and --port 0 takes a free one (the
start line names it). Ctrl-C (or SIGTERM) stops it cleanly: uvicorn finishes the requests in flight.
"""

from __future__ import annotations

import errno
import ipaddress
import signal
import socket
import sys

from emotion_dist.errors import ConfigError
from emotion_dist.utils import filekind
from emotion_dist.utils.paths import check_outside_data

LOOPBACK_HINT = "only this machine can reach it; --host 0.0.0.0 serves it to the network"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one line saying why not."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a port (0-65535; 0 = any free port)")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=128)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is in use (another demo?); pick another with --port, "
                              f"or --port 0 for any free one") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise ConfigError(f"port {port} on {host} needs privileges; pick one above 1023 with --port") from None
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); check --host and --port") from None
    return sock


def reach(host: str) -> str:
    try:
        if ipaddress.ip_address(host).is_loopback:
            return LOOPBACK_HINT
    except ValueError:
        if host == "localhost":
            return LOOPBACK_HINT
    return "reachable from the network on that address: anyone who can reach it can use the model and your uploads"


def run_demo(args) -> int:
    import uvicorn

    from emotion_dist.inference.demo.app import create_app

    if args.save and filekind.kind(args.checkpoint) == filekind.TORCH:  # the data it was trained on, if recorded
        from emotion_dist.modelio import recorded_data  # torch: only for a .pt

        check_outside_data(args.save, recorded_data(args.checkpoint), option="--save")
    app = create_app(args.checkpoint, max_upload_mb=args.max_upload_mb, save_dir=args.save,
                     cam_layer=args.cam_layer)  # a bad model or layer: one line
    sock = bind(args.host, args.port)
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    info = app.state.model.info
    saving = f"uploads saved to {args.save}" if args.save else "nothing is written to disk (--save DIR keeps uploads)"
    print(f"emotion-dist demo: http://{shown}:{port}/ ({reach(args.host)}); model {info['name']} ({info['format']}), "
          f"uploads up to {args.max_upload_mb:g} MB, {saving}; API docs at /docs; Ctrl-C stops it", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGINT and SIGTERM and then raises the signal again with the
    # handler it found: as KeyboardInterrupt for both, so a scheduler's or systemd's SIGTERM exits 0 too.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # a second Ctrl-C during the graceful shutdown
        pass
    finally:
        sock.close()
    print("emotion-dist demo: stopped", file=sys.stderr, flush=True)
    return 0
