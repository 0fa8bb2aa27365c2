"""Where a peer's local API is: shared by the daemon and by `dragonfly get`, which must
start fast (it imports nothing of the daemon to find it)."""

from __future__ import annotations

from pathlib import Path

LOCAL_API = "/_dragonfly/tasks"
SOCKET_NAME = "api.sock"


def api_socket(data_dir: Path) -> Path:
    """The unix socket of the peer whose data directory is `data_dir`."""
    return data_dir / SOCKET_NAME
