"""The mirror's state file (state=PATH): which copies hold the disk's current data.

A copy that misses a write is stale from then on, and reading it would return old data.  The file
says which copies are in sync, so that a mirror started again never reads a stale one.  The mirror
writes it before acknowledging a write that a copy missed, and when a rebuilt copy rejoins.  It is
JSON, one object:

    {"format": "nbdformats-mirror-state", "version": 1, "size": 1073741824,
     "copies": {"nbd://host1/disk": "in-sync", "nbd://host2/disk": "stale"}}

- `size`: the mirror's size in bytes, which stays the same across restarts.
- `copies`: every copy, by its server= URI exactly as given, "in-sync" or "stale".

It is replaced atomically: the new content goes to a temporary file in the same directory, which is
flushed to disk (fsync), renamed over the old one, and the directory flushed, so that a crash leaves the
old file or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

from ..api.errors import ConfigError

FORMAT = "nbdformats-mirror-state"
VERSION = 1
IN_SYNC, STALE = "in-sync", "stale"
MAX_STATE_FILE = 1024 * 1024  # a state file is a few hundred bytes per copy


@dataclass(frozen=True)
class MirrorState:
    size: int
    copies: dict[str, bool]  # server= URI -> whether it is in sync


def load(path: str) -> MirrorState | None:
    """The state recorded in `path`, or None if there is no such file yet (ConfigError if it is not a
    state file)."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_STATE_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"mirror: state={path}: {e.strerror}") from None
    try:
        if len(text) > MAX_STATE_FILE:
            raise ValueError("too large")
        record = json.loads(text)
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        if record.get("version") != VERSION:
            raise ValueError(f"version {record.get('version')!r}, this mirror knows version {VERSION}")
        size, copies = record.get("size"), record.get("copies")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError("no valid size")
        if not isinstance(copies, dict) or not all(
                isinstance(uri, str) and state in (IN_SYNC, STALE) for uri, state in copies.items()):
            raise ValueError(f'"copies" must map URIs to "{IN_SYNC}" or "{STALE}"')
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"mirror: state={path}: {e}") from None
    return MirrorState(size, {uri: state == IN_SYNC for uri, state in copies.items()})


def save(path: str, state: MirrorState) -> None:
    """Replace `path` with `state`, atomically and durably (raises OSError)."""
    record = {"format": FORMAT, "version": VERSION, "size": state.size,
              "copies": {uri: IN_SYNC if in_sync else STALE for uri, in_sync in state.copies.items()}}
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".mirror-state-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
