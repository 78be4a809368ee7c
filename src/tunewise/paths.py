"""What a path the user gave is, told apart the way a message must tell them apart: `Path.exists()` is False both
for a missing path and for a symlink loop, which then read as "not found" for a path the user can see."""
from __future__ import annotations

import errno
import os
import stat


def path_kind(path: str | os.PathLike) -> str:
    """'file', 'folder', 'missing', 'dangling' (a symlink to nothing) or 'loop' (symlinks leading back to
    themselves). Other OS errors (no permission, a file used as a folder) are raised."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "dangling" if os.path.islink(path) else "missing"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "loop"
        raise
    return "folder" if stat.S_ISDIR(st.st_mode) else "file"
