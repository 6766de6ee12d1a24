"""Files the analysts' commands write where the user asks (`similar --output`, `map --png/--html`, `compare
--report`): checked before any work, then written whole or not at all.

- Nothing is written inside an output root of tables (`--out`, `--b-out`): only the store's commits (and `index`,
  into `_indexes/`) write there, and `embed` refuses a root holding anything else, so a report left there would
  block the next run. Nothing is written inside any Delta table either, wherever it is: replacing a part file
  corrupts the table.
- An existing file is replaced only when the user named it (a folder, a missing folder, a file where a folder
  should be, a folder this user cannot write: one-line errors naming the fix).
- The file is written beside its target and renamed over it, so a failed write (disk full, permission) leaves the
  previous file as it was and no partial one.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.errors import OutputError


@dataclass(frozen=True)
class OutputFile:
    """A local file an option names, checked to be writable without touching any table.

    Attributes:
        option: the option that named it (e.g. `--output`), for messages.
        path: where it is written (symbolic links resolved).
    """

    option: str
    path: Path

    @classmethod
    def check(cls, option: str, value: str, tables: Sequence[TableStore], suffixes: tuple[str, ...] = ()) -> OutputFile:
        """Check the file `value` can be written (see the module docstring) before any work is done.

        Args:
            option: the option, for messages.
            value: the file name as given.
            tables: the stores the command reads: nothing is written inside their roots.
            suffixes: accepted file name endings, lower case (any when empty).

        Raises:
            OutputError: naming what is wrong and what to pass instead.
        """
        path = _local(option, value, tables)
        if path.is_dir():
            msg = f"{option} {value} is a folder: name a file (in it, or elsewhere)"
            raise OutputError(msg)
        if suffixes and path.suffix.lower() not in suffixes:
            msg = f"{option} {value}: use a {', '.join(suffixes)} file name"
            raise OutputError(msg)
        check_writable_folder(option, value, path.parent)
        return cls(option, path)

    def write(self, write: Callable[[Path], None]) -> None:
        """Call `write(path)` on a file beside the target, then rename it over the target.

        Raises:
            OutputError: the file could not be written (disk full, permission); the target is left as it was.
        """
        aside = self.path.with_name(f".{self.path.stem}.tmp-{uuid.uuid4().hex}{self.path.suffix}")
        try:
            write(aside)
            os.replace(aside, self.path)
        except OSError as exc:
            msg = f"cannot write {self.option} {self.path}: {exc.strerror or exc}: free space or name a writable place"
            raise OutputError(msg) from exc
        finally:
            with contextlib.suppress(OSError):
                aside.unlink(missing_ok=True)


def output_folder(option: str, value: str, tables: Sequence[TableStore]) -> Path:
    """Check the folder `value` can hold the command's files (created by `make_folder` when missing).

    Raises:
        OutputError: it is a file, lies inside a table's folder, or the nearest existing folder cannot be written.
    """
    path = _local(option, value, tables)
    if path.exists() and not path.is_dir():
        msg = f"{option} {value} is a file: name a folder (it is created when missing)"
        raise OutputError(msg)
    existing = next(p for p in (path, *path.parents) if p.exists())
    check_writable_folder(option, value, existing)
    return path


def make_folder(option: str, path: Path) -> None:
    """Create the folder `output_folder` checked.

    Raises:
        OutputError: it could not be created.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"cannot create {option} {path}: {exc.strerror or exc}: name a folder you can write"
        raise OutputError(msg) from exc


def local_root(store: TableStore) -> Path | None:
    """The store's root as a resolved local path, or None for tables in an object store."""
    if "://" in store.root and not store.root.startswith("file://"):
        return None
    return Path(store.root_path).resolve()


def _local(option: str, value: str, tables: Sequence[TableStore]) -> Path:
    """`value` as an absolute local path, refused where it lies inside an output root or a Delta table."""
    if "://" in value and not value.startswith("file://"):
        msg = f"{option} {value}: name a local file (reports are written on this machine)"
        raise OutputError(msg)
    path = Path(value.removeprefix("file://")).expanduser().resolve()
    for store in tables:
        root = local_root(store)
        if root is not None and (path == root or root in path.parents):
            msg = (
                f"{option} {value} is inside the tables' folder {store.root}, where only catalog-embed's commits "
                "write (anything else there stops the next `embed`): write it elsewhere, e.g. "
                f"{root.parent / path.name}"
            )
            raise OutputError(msg)
    table = next((p for p in (path, *path.parents) if (p / "_delta_log").is_dir()), None)
    if table is not None:
        msg = f"{option} {value} is inside the Delta table {table}: write it outside any table"
        raise OutputError(msg)
    return path


def check_writable_folder(option: str, value: str, folder: Path) -> None:
    """Raise OutputError unless `folder` is an existing folder this user can write (`value` of `option` lies there)."""
    if not folder.exists():
        msg = f"{option} {value}: the folder {folder} does not exist: create it, or name a file in an existing folder"
        raise OutputError(msg)
    if not folder.is_dir():
        msg = f"{option} {value}: {folder} is a file, not a folder: name a file in a folder"
        raise OutputError(msg)
    if not os.access(folder, os.W_OK | os.X_OK):
        msg = f"{option} {value}: this user cannot write in {folder}: name a file in a folder you can write"
        raise OutputError(msg)
