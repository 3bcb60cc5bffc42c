"""The process's open-file limit, raised to what CARVAE_MAX_CONNECTIONS needs.

Every connection is a file descriptor. Past the soft RLIMIT_NOFILE, accept() fails with EMFILE: asyncio
drops the connection without a byte, so a client over the limit gets a reset instead of the service's
JSON 503 for a connection over MAX_CONNECTIONS, and nothing is logged. Many hosts and container runtimes
start processes with a soft limit of 1024 under a much higher hard one, which an unprivileged process may
raise itself (as Go programs do at start-up).
"""

from __future__ import annotations

# The descriptors a serving process holds besides its client connections (measured: ~16 when idle: the
# listening socket, the event loop's selector and wake-up pipe, stdio), with room for connections over
# MAX_CONNECTIONS, which are accepted to be answered 503 and closed.
RESERVE = 64


def ensure_open_files(max_connections: int) -> str | None:
    """Raise the soft open-file limit to what max_connections needs, up to the hard limit. Returns a
    warning line when even the hard limit is too low, else None."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    needed = max_connections + RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # e.g. macOS caps the soft limit below a hard "unlimited"
            pass
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    return (
        f"CARVAE_MAX_CONNECTIONS={max_connections} needs about {needed} open files, but this process may "
        f"have {soft} (ulimit -n): connections beyond about {max(soft - RESERVE, 0)} are dropped without an "
        "answer; lower CARVAE_MAX_CONNECTIONS or raise the limit (docker run --ulimit nofile=N:N)"
    )
