"""Writes that never leave a half-written file behind, provenance for what is written, and a digest of the code
that wrote it (what caches are keyed on)."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import secrets
import shlex
import subprocess
import sys
import types
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a synced temporary file and `os.replace`: readers see old or new, never half."""
    atomic_write_files({path: data})


def atomic_write_files(files: Mapping[str | os.PathLike, bytes]) -> None:
    """Write several files that belong together (an aligner's tensors and the JSON holding their sha256): each
    goes to a synced temporary file first, then all are renamed into place back to back. Each file is old or
    new, never half; the pair is mixed only if the process dies between two renames (microseconds), and a
    reader that checks the sha256 then refuses it rather than reading wrong data."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = _new_temporary(path)
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise
    for directory in {path.parent for _, path in staged}:  # the renames themselves survive a power cut
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _new_temporary(path: Path) -> tuple[int, Path]:
    """A new, empty file `.NAME.RANDOM.tmp` beside `path`, open for writing. Its mode is 0o666 less the umask, as
    for any file a program creates (`tempfile.mkstemp` would make it 0600 whatever the umask, and a run or cache
    shared by a group could then not be read by it)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def json_bytes(obj: Any) -> bytes:
    """The one JSON layout of every file written here: indented, keys sorted, a final newline."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def read_json(path: str | os.PathLike, max_bytes: int | None = None) -> Any:
    """Parse a JSON file, naming the file in any error; one larger than `max_bytes` is refused before it is read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise ValueError(f"{path}: {path.stat().st_size:,} bytes, more than the {max_bytes:,} this file may hold")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid UTF-8 JSON ({err})") from err
    except RecursionError as err:  # json's parser recurses once per level of nesting
        raise ValueError(f"{path}: JSON nested too deeply to read") from err


def provenance(**extra: Any) -> dict[str, Any]:
    """Where an artefact came from: the command, the time, the code and library versions."""
    versions = {}
    for package in ("aligner-workbench", "torch", "transformer-lens", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "versions": versions,
        **extra,
    }


def command_line() -> str:
    """The command that is running, as it would be typed again: `aligner train --data ...`, `python -m aligner
    ...`; where Python runs code of its own (`python -c`, a notebook, the interactive prompt) the library function
    called, which the arguments of that process do not say: `python -c (library call: aligner.train.train_sft)`."""
    argv = sys.argv if sys.argv else [""]
    program = Path(argv[0])
    if program.name == "__main__.py":  # python -m PACKAGE
        return shlex.join(["python", "-m", program.parent.name, *argv[1:]])
    if argv[0] and argv[0] != "-c" and not program.name.startswith("ipykernel"):
        return shlex.join([program.name, *argv[1:]])
    how = {"-c": "python -c", "": "python (interactive)"}.get(argv[0], "python (notebook)")
    call = _outermost_library_call()
    return f"{how} (library call: {call})" if call else how


def _outermost_library_call() -> str | None:
    """The first function of this package that the running code called (the frame nearest the stack's bottom),
    as `aligner.train.train_sft`."""
    package = __name__.partition(".")[0]
    frame, outermost = sys._getframe(1), None
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.partition(".")[0] == package:
            outermost = f"{module}.{frame.f_code.co_qualname}"
        frame = frame.f_back
    return outermost


def source_digest(*modules: types.ModuleType) -> str:
    """A digest of the Python source of `modules` (a package: every file below it): what is kept on disk under it
    (activations, the app's `st.cache_data`, whose own key hashes only the cached function's body) is computed
    again once the code it ran through changes."""
    digest = hashlib.sha256()
    for module in modules:
        path = Path(module.__file__)
        files = sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
        for file in files:
            digest.update(file.relative_to(path.parent).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
