"""The data directory is its owner's only: 0700 directories, 0600 files, no symlinks.

Task files hold what clients downloaded (private files included) and metadata.db
what they downloaded it from. At start the directory must belong to this user (or
root): one owned by another user is refused, since that user could read or swap
what is in it. Files and directories under it are created owner-only and opened
with O_NOFOLLOW, so a symlink planted there (to /etc/shadow, to another user's
file) is refused with an error that names it instead of being followed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from .errors import StorageError

DIR_MODE = 0o700
FILE_MODE = 0o600


def link_refused(path: Path) -> StorageError:
    return StorageError(
        f"{path} is a symbolic link: links inside the data directory are refused "
        "(remove it; the data directory itself may be a link)"
    )


def prepare_data_dir(path: Path) -> None:
    """Create the data directory (0700) or check an existing one: it must belong to this
    user or root, and is made 0700 when it is ours."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    st = os.stat(path)
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        raise StorageError(
            f"data directory {path} belongs to user {st.st_uid}, not to this user ({me}) "
            "or root: refusing to use it (give it to this user, or pick another)"
        )
    if st.st_uid == me and stat.S_IMODE(st.st_mode) != DIR_MODE:
        os.chmod(path, DIR_MODE)


def private_dir(path: Path) -> None:
    """A directory under the data directory (and its missing parents): created 0700; a
    symlink there is refused."""
    if not os.path.lexists(path.parent):
        private_dir(path.parent)
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise link_refused(path) from None
        if not stat.S_ISDIR(st.st_mode):
            raise StorageError(f"{path} is not a directory") from None
        if stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.geteuid():
            os.chmod(path, DIR_MODE)


def open_private(path: Path, flags: int) -> int:
    """os.open with O_NOFOLLOW and O_CLOEXEC; a new file is 0600, an existing one made
    0600. A symlink at `path` is a StorageError naming it."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise link_refused(path) from None
        raise
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def secure_existing(path: Path) -> None:
    """An existing file the process does not open itself (SQLite's -wal and -shm): refuse
    a symlink, make it 0600."""
    with contextlib.suppress(FileNotFoundError):
        os.close(open_private(path, os.O_RDONLY))
