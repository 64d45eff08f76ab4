"""Result files: one new directory per run, atomic writers, and the versioned results.json envelope.

Every run writes into ``result_dir/<YYYYmmdd-HHMMSS>-<kind>[-N]/`` (``new_run_dir``); a directory is never
reused.  Every file is written atomically (a temporary file in the same directory, fsync, then
``os.replace``), so a reader, or a run killed half-way, never sees half a file.

``single`` and ``stream`` share one results.json schema (``envelope``)::

    schema_version, kind, complete, started_at, finished_at, argv, config, machine, <body keys...>

``complete`` is False for the partial results written after Ctrl-C or a crash.  ``read_results`` refuses a
file of another ``schema_version`` with a message that says what to do.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as dt
import enum
import gzip
import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from cortexbench.errors import ConfigError, CortexbenchError, Interrupted, UsageError

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
_ENVELOPE_KEYS = ("schema_version", "kind", "complete", "started_at", "finished_at", "argv", "config", "machine")


# --- run directories ----------------------------------------------------------------------------


def new_run_dir(result_dir: Path, kind: str, now: dt.datetime | None = None) -> Path:
    """Create and return ``result_dir/<YYYYmmdd-HHMMSS>-<kind>``, or ``...-<kind>-2``, ``-3``... when
    that exists (never an existing directory, even with two runs in the same second)."""
    result_dir = Path(result_dir)
    try:
        result_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"result_dir {result_dir} cannot be created ({e.strerror or e}); "
                          f"pick another with --result-dir") from None
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        path = result_dir / (f"{stamp}-{kind}" if n == 1 else f"{stamp}-{kind}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise ConfigError(f"cannot create a run directory in result_dir {result_dir} ({e.strerror or e}); "
                              f"pick another with --result-dir") from None
        return path
    raise ConfigError(f"result_dir {result_dir} has 10000 runs named {stamp}-{kind}; clean it up")


# --- atomic writers -----------------------------------------------------------------------------


@contextmanager
def keeping_partial(run_dir: Path, measured: Callable[[], int], write_partial: Callable[[], object], *, prog: str,
                    total: int, what: str = "sweep") -> Iterator[None]:
    """Around a sweep (``single``, ``experiments``): when it stops on an error or Ctrl-C, what was measured
    (``measured()`` points) is written by ``write_partial`` and said on stderr; with nothing measured the
    empty run directory is removed.  Ctrl-C becomes ``Interrupted``; any other error goes on up."""
    try:
        yield
    except BaseException as e:
        saved = ""
        n = measured()
        if n:
            try:
                write_partial()
                saved = f"; what was measured is in {run_dir}"
            except Exception as write_error:  # the original error matters more than this one
                saved = f"; partial results could not be written ({write_error})"
        else:  # nothing measured: leave no empty run directory behind
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(f"interrupted after {n} of {total} points{saved}") from None
        if saved:
            print(f"{prog}: the {what} stopped{saved}", file=sys.stderr)
        raise


@contextmanager
def _atomic(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """A file object whose content appears at ``path`` only when the block ends without an exception."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise CortexbenchError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": ""} if "b" not in mode else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise CortexbenchError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    _fsync_dir(path.parent)


_UMASK: int | None = None


def _umask() -> int:
    """The process umask, read once (from /proc where it can be read without changing it)."""
    global _UMASK
    if _UMASK is None:
        try:
            line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("Umask:"))
            _UMASK = int(line.split()[1], 8)
        except (OSError, StopIteration, ValueError, IndexError):
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return _UMASK


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> Path:
    with _atomic(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: Path, text: str) -> Path:
    with _atomic(path, "w") as f:
        f.write(text)
    return Path(path)


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types for ``obj``: numpy scalars and arrays, Paths, dataclasses, datetimes, enums,
    sets and tuples are converted; NaN and infinities become None (JSON null)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.dtype.kind in "biu" else to_jsonable(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, str) else k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(to_jsonable(v) for v in obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (dt.datetime, dt.date, dt.time)):
        return obj.isoformat()
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if hasattr(obj, "to_dict"):
        return to_jsonable(obj.to_dict())
    raise TypeError(f"cannot write a {type(obj).__name__} to JSON")


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (see ``to_jsonable`` for what it converts), atomically."""
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False, ensure_ascii=False)
    return write_text(path, text + "\n")


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """A CSV file with a header line; None and NaN become empty cells."""
    with _atomic(path, "w") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(_clean_row(r) for r in rows)
    return Path(path)


def _clean_row(row: Sequence[Any]) -> list[Any]:
    return ["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in row]


ColumnData = Mapping[str, Any] | Sequence[np.ndarray]


def _is_columns(data: Any, width: int) -> bool:
    if isinstance(data, Mapping):
        return True
    if isinstance(data, (list, tuple)) and len(data) == width and width > 0:
        return all(isinstance(c, np.ndarray) and c.ndim == 1 for c in data)
    return False


def _format_column(col: np.ndarray) -> list[str]:
    """A column as CSV cells: floats in shortest round-trip form (NaN empty), ints as ints, text quoted
    where needed."""
    kind = col.dtype.kind
    if kind in "iu":
        return list(map(str, col.tolist()))
    if kind == "b":
        return ["1" if v else "0" for v in col.tolist()]
    if kind == "f":
        cells = list(map(repr, col.astype(np.float64).tolist()))
        if not np.isfinite(col).all():
            bad = np.flatnonzero(np.isnan(col)).tolist()
            for i in bad:
                cells[i] = ""
        return cells
    values = col.tolist()
    if all(type(v) is str for v in values):
        joined = "".join(values)
        if not any(c in joined for c in ',"\n\r'):
            return values
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append("")
            continue
        s = v if isinstance(v, str) else str(v)
        if any(c in s for c in ',"\n\r'):
            s = '"' + s.replace('"', '""') + '"'
        out.append(s)
    return out


def write_csv_gz(path: Path, header: Sequence[str], rows_or_columns: ColumnData | Iterable[Sequence[Any]],
                 *, compresslevel: int = 1) -> Path:
    """A gzip-compressed CSV file, atomically.

    ``rows_or_columns`` is either columns (a mapping from each header name to a 1-D array, or a list of
    1-D numpy arrays, one per header name), which is the fast path (100K rows x 16 columns in well under
    a second), or rows (any iterable of sequences, or a 2-D array).  The gzip header carries no time, so
    equal data gives equal bytes.  ``compresslevel`` 1 is about four times as fast as gzip's default 6 on
    such data, for files about 10% larger."""
    header = list(header)
    if _is_columns(rows_or_columns, len(header)):
        if isinstance(rows_or_columns, Mapping):
            missing = [h for h in header if h not in rows_or_columns]
            if missing:
                raise ValueError(f"write_csv_gz: no column for {', '.join(missing)}")
            cols = [np.asarray(rows_or_columns[h]) for h in header]
        else:
            cols = [np.asarray(c) for c in rows_or_columns]
        lengths = {len(c) for c in cols}
        if len(lengths) > 1:
            raise ValueError(f"write_csv_gz: columns of different lengths {sorted(lengths)}")
        cells = [_format_column(c) for c in cols]
        body = "\n".join(map(",".join, zip(*cells, strict=True)))
        text = ",".join(header) + "\n" + (body + "\n" if body else "")
    else:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        rows = rows_or_columns.tolist() if isinstance(rows_or_columns, np.ndarray) else rows_or_columns
        w.writerows(_clean_row(r) for r in rows)
        text = buf.getvalue()
    with _atomic(path, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f,
                                                 compresslevel=compresslevel, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    return Path(path)


# --- results.json -------------------------------------------------------------------------------


def _iso(t: dt.datetime | float | str | None) -> str | None:
    if t is None or isinstance(t, str):
        return t
    if isinstance(t, (int, float)):
        t = dt.datetime.fromtimestamp(t, tz=dt.timezone.utc)
    if t.tzinfo is None:
        t = t.astimezone()  # naive means local time
    return t.isoformat(timespec="seconds")


def envelope(kind: str, config: Mapping[str, Any], machine: Mapping[str, Any], body: Mapping[str, Any], *,
             complete: bool, started_at: dt.datetime | float | str | None,
             finished_at: dt.datetime | float | str | None, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The results.json of ``single`` and ``stream``: the versioned header, then ``body``'s keys.

    ``started_at``/``finished_at`` are datetimes (naive ones are local time), epoch seconds or ISO strings;
    they are written as ISO 8601 with the UTC offset.  ``argv`` defaults to ``sys.argv``."""
    clash = [k for k in body if k in _ENVELOPE_KEYS]
    if clash:
        raise ValueError(f"results body may not use the envelope's keys: {', '.join(clash)}")
    out: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "complete": bool(complete),
        "started_at": _iso(started_at),
        "finished_at": _iso(finished_at),
        "argv": list(sys.argv if argv is None else argv),
        "config": dict(config),
        "machine": dict(machine),
    }
    out.update(body)
    return out


def read_results(path: Path) -> dict[str, Any]:
    """A results.json (or the run directory holding one), checked for its schema version."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; give a run directory or its {RESULTS_FILE}") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid JSON ({e}); the run may have been killed while writing it") from None
    if not isinstance(data, dict) or "schema_version" not in data:
        raise UsageError(f"{path}: not a cortexbench results file (no schema_version)")
    version = data["schema_version"]
    if version != SCHEMA_VERSION:
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        raise UsageError(f"{path}: results schema_version {version} is not the one this cortexbench reads "
                         f"({SCHEMA_VERSION}); " + ("upgrade cortexbench" if newer else
                                                    "use the cortexbench version that wrote it"))
    return data
