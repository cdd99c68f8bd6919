"""Where models may be imported from, and what is refused at the door.

A source is a path inside one of the allowed roots, or a bundled model named
`bundled:<name>`. Refused: `..` anywhere in the path (INVALID_ARGUMENT), a path
or a symlink inside a source directory that resolves outside every root
(PERMISSION_DENIED), anything but regular files and directories (a named pipe, a
socket or a device would block or never end a read: INVALID_ARGUMENT), and pickle
weights unless `allow_pickle` is on.
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

from llmos.common.errors import InvalidArgument, NotFound, PermissionDenied
from llmos.registry.bundled import DEFAULT_MODEL, smollm2_gguf

BUNDLED: dict[str, Callable[[], Path]] = {DEFAULT_MODEL: smollm2_gguf}
BUNDLED_PREFIX = "bundled:"


class SourcePolicy:
    def __init__(self, roots: list[Path]) -> None:
        self.roots = [Path(r).resolve() for r in roots]

    def _inside(self, path: Path) -> bool:
        return any(path.is_relative_to(root) for root in self.roots)

    def resolve(self, source: str) -> Path:
        """The real path of an allowed source; raises with a reason otherwise."""
        if not source:
            raise InvalidArgument.field("source", "is required", reason="MISSING_FIELD")
        if source.startswith(BUNDLED_PREFIX):
            name = source.removeprefix(BUNDLED_PREFIX)
            if name not in BUNDLED:
                raise NotFound(f"no bundled model {name!r} (bundled: {', '.join(sorted(BUNDLED))})",
                               reason="SOURCE_NOT_FOUND", metadata={"source": source})
            try:
                return BUNDLED[name]()
            except FileNotFoundError as exc:
                raise NotFound(str(exc), reason="SOURCE_NOT_FOUND", metadata={"source": source}) from None
        path = Path(source).expanduser()
        if ".." in path.parts:
            raise InvalidArgument.field("source", "must not contain '..'", reason="PATH_TRAVERSAL")
        if not path.is_absolute():
            if not self.roots:
                raise PermissionDenied("no import roots are configured", reason="SOURCE_OUTSIDE_ALLOWED_ROOTS")
            path = self.roots[0] / path
        if not path.exists():
            raise NotFound(f"source {source!r} does not exist", reason="SOURCE_NOT_FOUND",
                           metadata={"source": source})
        real = path.resolve()
        if not self._inside(real):
            raise PermissionDenied(
                f"source {source!r} is outside the allowed import roots", reason="SOURCE_OUTSIDE_ALLOWED_ROOTS",
                metadata={"source": source, "roots": ",".join(str(r) for r in self.roots)})
        _regular(real, source)
        if real.is_dir():
            for entry in real.iterdir():
                if entry.is_symlink() and not self._inside(entry.resolve()):
                    raise PermissionDenied(
                        f"{entry.name} in {source!r} links outside the allowed import roots",
                        reason="SYMLINK_OUTSIDE_ALLOWED_ROOTS", metadata={"source": source, "file": entry.name})
                _regular(entry, source)
        return real


def _regular(path: Path, source: str) -> None:
    """Refuses what is neither a regular file nor a directory (checked without opening it)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return              # a dangling link: the importer says what is missing
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InvalidArgument.field("source", f"{path.name} in {source!r} is not a regular file or a directory",
                                    reason="SOURCE_NOT_A_FILE")
