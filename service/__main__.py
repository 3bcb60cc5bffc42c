"""`python -m service`: load the checkpoint, then serve it with uvicorn.

The checkpoint and device are loaded here, before uvicorn starts, so that a missing, corrupt or
incompatible checkpoint, a device that is not there or a bad setting ends start-up with ONE line on stderr
(`carvae: error: ...`) and exit status 2, instead of a traceback from inside the server's lifespan.
"""

from __future__ import annotations

import os
import sys

from service import launch

if __name__ == "__main__":  # before the heavy imports below (the console script: launch.serve)
    launch.begin()

import argparse
import logging
import math
import socket
import textwrap
from typing import NoReturn

from pydantic import ValidationError

from carvae.checkpoint import CheckpointError, load_checkpoint
from carvae.device import DeviceError, pick_device
from service.config import Settings, unknown_variables
from service.logs import JsonFormatter, configure_logging
from service.openfiles import ensure_open_files
from service.threads import use_one_thread

log = logging.getLogger("carvae.service")

EXIT_CONFIG = 2
EXIT_NOT_STARTED = 3  # uvicorn's own status for a server that could not start


def _fail(message: str, status: int = EXIT_CONFIG) -> NoReturn:
    line = f"carvae: error: {message}"
    # Read directly: the settings may be what failed. A collector of JSON logs parses every line.
    if os.environ.get("CARVAE_LOG_FORMAT", "").strip().lower() == "json":
        record = logging.makeLogRecord(
            {"name": log.name, "levelname": "ERROR", "levelno": logging.ERROR, "msg": line}
        )
        line = JsonFormatter().format(record)
    print(line, file=sys.stderr)
    sys.exit(status)


def _as_typed(default: object) -> str:
    """A default as one would write it in the variable (and as the README's table has it): true, not
    Python's True; 5, not 5.0."""
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    if isinstance(default, list):  # comma-separated in the variable
        return ",".join(map(str, default)) or "empty"
    return str(default) or "empty"


def _settings_help() -> str:
    lines = ["environment variables (defaults in brackets):"]
    column = max(map(len, Settings.model_fields))
    for name, f in Settings.model_fields.items():
        default = _as_typed(f.get_default(call_default_factory=True, validated_data={}))
        lines += textwrap.wrap(
            f"{f.description or ''} [{default}]",
            width=100,
            initial_indent=f"  CARVAE_{name:<{column}}  ",
            subsequent_indent=" " * (column + 11),
        )
    return "\n".join(lines)


def _load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as e:
        err = e.errors()[0]
        name = ".".join(str(p) for p in err["loc"])
        if err["type"] == "value_error":  # a validator's own message, which names the bad part
            msg = str(err["ctx"]["error"])
        elif name == "API_KEY":  # never into a log
            msg = err["msg"]
        else:  # pydantic's says what was wrong but not with what: "less than or equal to 1000" for nan
            msg = f"{err['msg']} (got {err['input']!r})"
        _fail(f"invalid setting CARVAE_{name}: {msg}")


def _check_listen_address(settings: Settings) -> None:
    # uvicorn resolves the host and binds only after the model has loaded and "ready" is logged, then fails
    # with "[Errno -2] Name or service not known" (naming neither the setting nor the value) or reports a
    # taken port among its start-up lines: a second `make run` beside the first looked ready before it
    # exited. The same resolution and bind, tried first (a server taking the port in between still gets
    # uvicorn's own message).
    try:
        addresses = socket.getaddrinfo(
            settings.HOST, settings.PORT, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as e:
        _fail(f"invalid setting CARVAE_HOST: {settings.HOST!r} is not an address to listen on ({e.strerror})")
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio binds: the IPv4 wildcard is a socket of its own
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as e:
                _fail(
                    f"cannot listen on {address[0]} port {settings.PORT} ({(e.strerror or str(e)).lower()}): "
                    "another server is there; stop it or choose another CARVAE_PORT",
                    EXIT_NOT_STARTED,
                )


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m service",
        description="Serve a carvae checkpoint over HTTP. Every setting is a CARVAE_* environment variable.",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).parse_args(argv)
    settings = _load_settings()
    _check_listen_address(settings)
    configure_logging(settings.LOG_LEVEL, settings.LOG_FORMAT)
    for line in unknown_variables(os.environ):
        log.warning("%s", line)
    too_few_files = ensure_open_files(settings.MAX_CONNECTIONS)
    if too_few_files:
        log.warning("%s", too_few_files)
    log.debug("loading %s", settings.CHECKPOINT)  # debug: a failure below must stay ONE line at info
    try:
        device = pick_device(settings.DEVICE)
        # Before the first torch op: a thread that once computed on more threads keeps its OpenMP team,
        # which can slow every other team's passes; only the model threads compute on more (service.threads).
        use_one_thread()
        checkpoint = load_checkpoint(settings.CHECKPOINT, device)
    except DeviceError as e:
        _fail(str(e))
    except CheckpointError as e:
        try:
            missing = not settings.CHECKPOINT.exists()
        except OSError:  # a folder on the way that this user may not search: the error says so
            missing = False
        hint = (
            " (train one with `python -m trainer` — in Docker the compose stack's trainer does — "
            "or point CARVAE_CHECKPOINT at one)"
            if missing
            else ""
        )
        _fail(f"{e}{hint}")
    except Exception as e:  # e.g. out of device memory while moving the weights: still one line
        _fail(f"could not load checkpoint {settings.CHECKPOINT}: {type(e).__name__}: {e}")

    # Imported late: the FastAPI/uvicorn stack is not needed to report a configuration error.
    import uvicorn

    from service.connections import protocol_for
    from service.main import begin_drain, create_app
    from service.server import DrainingServer

    app = create_app(settings, checkpoint=checkpoint)
    config = uvicorn.Config(
        app,
        host=settings.HOST,
        port=settings.PORT,
        log_level=settings.LOG_LEVEL,
        log_config=None,  # uvicorn's own lines go through the format above instead of a second one
        access_log=False,  # our RequestContextMiddleware logs one line per request, with its id
        server_header=False,
        # Behind a proxy that strips a path prefix. uvicorn puts it in the scope's root_path and in front
        # of every path, as ASGI has it; the middleware matches paths without it (middleware.app_path).
        root_path=settings.ROOT_PATH,
        # A proxy on another host or container (nginx beside the compose stack): its X-Forwarded-Proto
        # makes the service's own redirects say https.
        forwarded_allow_ips=settings.FORWARDED_ALLOW_IPS,
        timeout_keep_alive=settings.KEEP_ALIVE_S,
        # httptools with limits on the request head (service.connections), its refusals counted
        http=protocol_for(settings, app.state.metrics.server_refused),
        # No route is a WebSocket: an Upgrade request is then served as the plain HTTP request it also is
        # (through the middleware: logged, counted, a JSON error), not refused by the websockets library
        # in text/plain, unseen by the app.
        ws="none",
        # On SIGTERM uvicorn stops accepting and waits for accepted requests: as long as they may take.
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
    )
    server = DrainingServer(config, lambda: begin_drain(app), settings.SHUTDOWN_DELAY_S)
    launch.serving = True
    server.run()
    if not server.started:  # e.g. the port is taken: uvicorn has logged why
        return EXIT_NOT_STARTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
