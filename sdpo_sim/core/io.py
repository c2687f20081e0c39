"""Files: atomic writes (readers, and a resumed sweep, never see half a file), checked output places, YAML reads
whose every failure is one line."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Type, Union

import yaml

PathLike = Union[str, Path]


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists (``Path.cwd()`` at the top of a relative path)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and not path.is_symlink() and path != path.parent:
        path = path.parent
    return path


def _probe_writable(directory: Path, label: str) -> None:
    """Create and remove a temporary directory in ``directory``: the only test that also holds for root and for
    read-only or pseudo file systems (``/proc``), where permission bits say nothing. Leaves nothing behind."""
    try:
        os.rmdir(tempfile.mkdtemp(dir=directory, prefix=".sdpo-write-probe-"))
    except OSError as err:
        raise ValueError(f"{label}: cannot create files or directories in {str(directory)!r} ({err.strerror}); "
                         "give a path in a writable directory") from None


def _check_creatable(path: Path, label: str) -> None:
    """``path`` (which may not exist yet) can be created: its nearest existing ancestor is a writable directory."""
    anchor = _nearest_existing(path)
    if not anchor.is_dir():
        kind = "a broken symbolic link" if anchor.is_symlink() and not anchor.exists() else "a file"
        raise ValueError(f"{label}: {str(anchor)!r} is {kind}, not a directory; give a path whose parents are directories")
    _probe_writable(anchor, label)


def check_output_dir(path: PathLike, what: str = "output directory") -> Path:
    """Refuse, before anything is created, a directory that cannot be made or written: an existing ``path`` must
    be a writable directory; otherwise its nearest existing ancestor must be a writable directory. Returns ``path``."""
    path = Path(path)
    label = f"{what} {str(path)!r}"
    if path.exists() and not path.is_dir():
        raise ValueError(f"{label} is an existing file; give a directory (a new one, or one this command wrote before)")
    _check_creatable(path, label)
    return path


def check_output_file(path: PathLike, what: str = "output file") -> Path:
    """Refuse, before anything is created, a file path that cannot be written: not a directory, and its
    directory (or nearest existing ancestor) a writable directory. Returns ``path``."""
    path = Path(path)
    label = f"{what} {str(path)!r}"
    if path.is_dir():
        raise ValueError(f"{label} is a directory; give a file path")
    _check_creatable(Path(os.path.abspath(path)).parent, label)
    return path


def remove_stale_temporaries(directory: PathLike) -> int:
    """Delete the temporary files :func:`atomic_write` leaves when its process is killed (``.NAME.*.tmp``); returns how many."""
    directory = Path(directory)
    stale = list(directory.glob(".*.tmp")) if directory.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return len(stale)


def read_yaml_file(path: PathLike, what: str, hint: str, loader: Type[yaml.SafeLoader] = yaml.SafeLoader) -> Any:
    """The YAML document in ``path``, parsed by ``loader`` (a safe loader: no Python tags).

    Every failure is a ``ValueError`` of one line naming ``what`` the file is and ``path``; the two
    failures a user fixes by giving another path (a directory, a missing file) end with ``hint``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory; {hint}")
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist; {hint}")
    try:
        return yaml.load(path.read_text(), Loader=loader)  # noqa: S506 — a SafeLoader (sub)class
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not a UTF-8 text file; it must be YAML text") from None
    except OSError as err:
        raise ValueError(f"{what} {path} cannot be read ({err.strerror})") from None
