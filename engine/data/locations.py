"""Where input files live: a local path, or a URL that fsspec can open (``s3://``, ``gs://``, ``hf://``,
``https://``, ``file://``, ``memory://``).

A shard's location is a ``Path`` when it is local (so the local path stays exactly what it was, ids and
speed included) and the URL string otherwise. Locations cross process boundaries as strings;
``as_location`` turns one back. Everything that opens, sizes or lists an input goes through here, so
every format reads from object storage the same way it reads from disk: as a stream of bytes, never
downloaded whole first.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import IO, Any

from engine.errors import UserError, first_line

Location = Path | str
"""A local ``Path``, or a URL string for fsspec."""

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_url(text: str | os.PathLike) -> bool:
    """``s3://b/x`` is, ``/data/x`` and ``C:\\x`` are not."""
    return isinstance(text, str) and _URL.match(text) is not None


def as_location(text: str | os.PathLike) -> Location:
    """The location a string names: a URL stays a string, anything else is a local ``Path``."""
    return text if is_url(text) else Path(text)


def name_of(location: Location) -> str:
    """The file name: the last part of the path or URL."""
    return location.name if isinstance(location, Path) else location.rstrip("/").rsplit("/", 1)[-1]


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for ``url``; a missing protocol package is one line."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:  # "Install s3fs to access S3", "Protocol not known"
        raise UserError(f"{url}: cannot open this kind of URL here ({first_line(error)})") from None


def open_input(location: Location) -> IO[bytes]:
    """A binary file object, read sequentially or by range (parquet): for a URL nothing is fetched until
    it is read, and then only what is read."""
    if isinstance(location, Path):
        return open(location, "rb")
    fs, path = filesystem(location)
    try:
        return fs.open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"input not found: {location}") from None


def stored_size(location: Location) -> int:
    """Bytes of the file as stored (compressed): what progress counts through."""
    if isinstance(location, Path):
        return location.stat().st_size
    fs, path = filesystem(location)
    return int(fs.size(path) or 0)


def fingerprint(location: Location) -> dict[str, Any]:
    """What must not change for work derived from a file to be reused: identity, size and a version
    (mtime for a local file; the ETag or modification time a store reports for a URL)."""
    if isinstance(location, Path):
        stat = location.stat()
        return {"path": str(location), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    fs, path = filesystem(location)
    info = fs.info(path)
    version = next((str(info[k]) for k in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created")
                    if info.get(k) is not None), None)
    return {"path": location, "size": int(info.get("size") or 0), "version": version}


def sort_locations(found: set[Location]) -> list[Location]:
    """Local paths in ``Path`` order (as before URLs were accepted: ids depend on it), then URLs."""
    local = sorted(p for p in found if isinstance(p, Path))
    return [*local, *sorted(p for p in found if not isinstance(p, Path))]


def expand_url(spec: str, supported) -> list[str]:
    """The files a URL names: itself, every supported file under it (a folder), or a glob's matches.

    ``supported(name)`` says whether a file name is an input format. A Hugging Face ``save_to_disk``
    folder gives its data files in the dataset's order (``state.json``).
    """
    import glob

    fs, path = filesystem(spec)
    try:
        if glob.has_magic(path):
            matches = [p for p in fs.glob(path) if fs.isfile(p) and supported(p)]
            if not matches:
                raise UserError(f"no input files match {spec}")
        elif supported(path) and fs.isfile(path):  # first: over https, asking isdir would fetch the file
            matches = [path]
        elif fs.isdir(path):
            saved = saved_dataset_files(lambda name: fs.cat_file(f"{path.rstrip('/')}/{name}"), spec)
            if saved is not None:
                return [fs.unstrip_protocol(f"{path.rstrip('/')}/{name}") for name in saved]
            matches = [p for p in fs.find(path) if supported(p)]
            if not matches:
                raise UserError(f"no supported input files in folder {spec}")
        elif fs.isfile(path):
            raise UserError(f"{spec}: unsupported file type")
        else:
            raise UserError(f"input not found: {spec}")
    except (OSError, ValueError) as error:  # no network, no credentials, a bad bucket name
        if isinstance(error, FileNotFoundError):
            raise UserError(f"input not found: {spec}") from None
        raise UserError(f"{spec}: {first_line(error)}") from None
    return [fs.unstrip_protocol(p) for p in matches]


def saved_dataset_files(read, where: str) -> list[str] | None:
    """The data files of a Hugging Face ``datasets`` folder written by ``save_to_disk`` (their names,
    from ``state.json``), or None when the folder is not one. ``read(name)`` returns a file's bytes or
    raises ``FileNotFoundError``. A ``DatasetDict`` folder (one subfolder per split) is refused in one
    line naming its splits: mixing train and test into one pool is never what was meant."""
    import orjson

    try:
        state = orjson.loads(read("state.json"))
    except (FileNotFoundError, orjson.JSONDecodeError):
        state = None
    if isinstance(state, dict) and isinstance(state.get("_data_files"), list):
        return [str(entry["filename"]) for entry in state["_data_files"] if isinstance(entry, dict)]
    try:
        splits = orjson.loads(read("dataset_dict.json")).get("splits")
    except (FileNotFoundError, orjson.JSONDecodeError, AttributeError):
        return None
    raise UserError(f"{where} is a DatasetDict saved with save_to_disk: pass one split's folder, e.g. "
                    f"{where.rstrip('/')}/{(splits or ['train'])[0]} (its splits: {', '.join(map(str, splits or []))})")
