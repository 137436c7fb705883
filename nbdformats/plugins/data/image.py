"""Evaluating a data expression into an image, then into a memory store.

An `Image` is the disk an expression describes, as runs over [0, size): each run is a piece of a
source (literal bytes, a fill byte, a range of a regular file, or another image repeated), and
what no run covers reads as zeroes.  Every write replaces what was under it, as nbdkit's writes
into its allocator do, but a repeat or a nested group is one run that refers to the nested image
instead of a copy: `( "Hello" )*1000000000` costs nothing until it is stored.

Storing (`store_image`) writes the runs into the plugin's memory store (the allocator=), after
checking that the pages it will allocate fit in this machine's memory.  Like nbdkit, data written
directly allocates pages (a single zero byte written makes an allocated page of zeroes), and pages
that a nested image leaves all zero are freed again.
"""

from __future__ import annotations

import bisect
import logging
import os
import stat
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator, Union

from ...api.errors import ConfigError
from .. import _subprocess
from ..memory import PAGE, SparsePages, WholeBuffer
from .expression import (AbsOffset, AlignOffset, Assign, Byte, Expr, File, Fill, Group, Name, RelOffset, Repeat,
                         Script, Slice, String, error)

log = logging.getLogger(__name__)

MAX_OFFSET = (1 << 63) - 1
CHUNK = 1 << 20  # bytes stored at a time
RENDER_LIMIT = 1 << 20  # nested images up to this size are rendered once and tiled when repeated
SCRIPT_TIMEOUT = 600  # seconds for one <(SCRIPT)
STREAM_LIMIT = 256 << 20  # bytes read from one script, pipe or device (a regular file is read when stored)


@dataclass(frozen=True)
class Literal:
    data: bytes


@dataclass(frozen=True)
class FillByte:
    byte: int


@dataclass(frozen=True)
class FileData:
    """A regular file's bytes, read when stored (the file is not held in memory twice)."""
    path: str


@dataclass(frozen=True, eq=False)
class Tiled:
    """A nested image, repeated as often as the run is long."""
    image: "Image"


Source = Union[Literal, FillByte, FileData, Tiled]


@dataclass
class Run:
    start: int
    length: int
    source: Source
    skip: int  # where in the source the run begins

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(eq=False)
class Image:
    size: int = 0
    runs: list[Run] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)

    def put(self, start: int, length: int, source: Source | None, skip: int = 0) -> None:
        """Replace [start, start + length) by a run of `source` (None: zeroes, a hole)."""
        if length <= 0:
            return
        end = start + length
        first = bisect.bisect_right(self.starts, start) - 1
        if first < 0 or self.runs[first].end <= start:
            first += 1
        last = bisect.bisect_left(self.starts, end)  # runs[first:last] overlap the range
        replacement = []
        if first < last and self.runs[first].start < start:
            left = self.runs[first]
            replacement.append(Run(left.start, start - left.start, left.source, left.skip))
        if source is not None:
            replacement.append(Run(start, length, source, skip))
        if first < last and self.runs[last - 1].end > end:
            right = self.runs[last - 1]
            replacement.append(Run(end, right.end - end, right.source, right.skip + end - right.start))
        self.runs[first:last] = replacement
        self.starts[first:last] = [run.start for run in replacement]

    @cached_property
    def pages(self) -> int:
        """At most how many memory pages storing this image allocates."""
        return sum(_run_pages(run) for run in self.runs)

    @cached_property
    def all_zero(self) -> bool:
        return all(_source_is_zero(run.source) for run in self.runs)

    @cached_property
    def rendered(self) -> bytes:
        """The whole image as bytes (only for images up to RENDER_LIMIT)."""
        out = bytearray(self.size)
        for offset, data in self.pieces(0, self.size):
            out[offset:offset + len(data)] = data
        return bytes(out)

    def pieces(self, start: int, end: int) -> Iterator[tuple[int, bytes | memoryview]]:
        """(offset, bytes) of the data in [start, end), in order, in pieces of at most CHUNK; holes skipped."""
        index = max(0, bisect.bisect_right(self.starts, start) - 1)
        for run in self.runs[index:]:
            if run.start >= end:
                return
            begin, stop = max(start, run.start), min(end, run.end)
            if begin < stop:
                yield from _run_pieces(run, begin, stop)


def _source_is_zero(source: Source) -> bool:
    if isinstance(source, FillByte):
        return source.byte == 0
    if isinstance(source, Tiled):
        return source.image.all_zero
    return False  # literal or file data: allocated even when it holds zeroes, as in nbdkit


def _run_pages(run: Run) -> int:
    if _source_is_zero(run.source):
        return 0
    spanned = run.length // PAGE + 2
    if isinstance(run.source, Tiled):
        image = run.source.image
        return min(spanned, (run.length // image.size + 2) * image.pages)
    return spanned


def _run_pieces(run: Run, begin: int, stop: int) -> Iterator[tuple[int, bytes | memoryview]]:
    """The data of run over [begin, stop)."""
    source, position = run.source, run.skip + begin - run.start
    if isinstance(source, Literal):
        yield begin, memoryview(source.data)[position:position + stop - begin]
    elif isinstance(source, FillByte):
        if source.byte:
            for offset in range(begin, stop, CHUNK):
                yield offset, bytes([source.byte]) * min(CHUNK, stop - offset)
    elif isinstance(source, FileData):
        with open(source.path, "rb") as f:
            for offset in range(begin, stop, CHUNK):
                data = os.pread(f.fileno(), min(CHUNK, stop - offset), position + offset - begin)
                if not data:
                    break  # the file shrank since it was measured: the rest reads as zeroes
                yield offset, data
    elif not source.image.all_zero:
        yield from _tiled_pieces(source.image, position, begin, stop)


def _tiled_pieces(image: Image, position: int, begin: int, stop: int) -> Iterator[tuple[int, bytes | memoryview]]:
    """The data of `image` repeated, from its byte `position` (may pass its size), at [begin, stop)."""
    if image.size <= RENDER_LIMIT:
        tile = image.rendered * (CHUNK // image.size + 2)  # any CHUNK-long window of the repeats
        for offset in range(begin, stop, CHUNK):
            at = (position + offset - begin) % image.size
            yield offset, memoryview(tile)[at:at + min(CHUNK, stop - offset)]
        return
    offset = begin
    while offset < stop:
        at = (position + offset - begin) % image.size
        length = min(image.size - at, stop - offset)
        for piece_offset, data in image.pieces(at, at + length):
            yield offset + piece_offset - at, data
        offset += length


@dataclass
class Binding:
    """One `expr -> \\NAME`, seen by the rest of its group; `outer` is what the expression itself sees."""
    name: str
    expr: Expr
    outer: "Binding | None"
    image: Image | None = None


class Evaluator:
    def evaluate(self, expr: Expr, scope: Binding | None = None) -> Image:
        """The image of an expression evaluated in its own scope: offsets start at 0."""
        image = Image()
        offset = 0
        items = expr.items if isinstance(expr, Group) else (expr,)
        for item in items:
            if isinstance(item, Assign):
                scope = Binding(item.name, item.expr, scope)
                continue
            offset = self._item(item, scope, image, offset)
            if offset > MAX_OFFSET:
                raise error(f"the data goes past 2^63-1 bytes (to offset {offset})")
            image.size = max(image.size, offset)
        return image

    def _item(self, item: Expr, scope: Binding | None, image: Image, offset: int) -> int:
        """Write one expression at offset; the offset after it."""
        if item is None:
            return offset
        if isinstance(item, Byte):
            image.put(offset, 1, Literal(bytes([item.value])))
            return offset + 1
        if isinstance(item, String):
            image.put(offset, len(item.data), Literal(item.data))
            return offset + len(item.data)
        if isinstance(item, Fill):
            image.put(offset, item.count, FillByte(item.byte) if item.byte else None)
            return offset + item.count
        if isinstance(item, AbsOffset):
            return item.offset
        if isinstance(item, RelOffset):
            if -item.delta > offset:
                raise error(f"data parameter @{item.delta} must not be larger than the current offset {offset}")
            return offset + item.delta
        if isinstance(item, AlignOffset):
            return -(-offset // item.alignment) * item.alignment
        if isinstance(item, File):
            return self._file(item.path, 0, None, image, offset)
        if isinstance(item, Script):
            return self._put_bytes(self._script(item.command, None), image, offset)
        if isinstance(item, Slice) and isinstance(item.expr, File):
            return self._file(item.expr.path, item.start, item.end, image, offset)
        if isinstance(item, Slice) and isinstance(item.expr, Script) and item.start == 0 and item.end is not None:
            if item.end < 0:
                raise error("<(SCRIPT)[N:M] does not describe a valid slice")
            return self._put_bytes(self._script(item.expr.command, item.end), image, offset)
        if isinstance(item, Name):
            binding = scope
            while binding is not None and binding.name != item.name:
                binding = binding.outer
            if binding is None:
                raise error(f"\\{item.name} not defined")
            if binding.image is None:
                binding.image = self.evaluate(binding.expr, binding.outer)
            return self._put_image(binding.image, 0, binding.image.size, image, offset)
        if isinstance(item, Group):
            nested = self.evaluate(item, scope)
            return self._put_image(nested, 0, nested.size, image, offset)
        if isinstance(item, Repeat):
            nested = self.evaluate(item.expr, scope)
            if nested.size * item.count > MAX_OFFSET:
                raise error(f"repeating {nested.size} bytes {item.count} times is more than 2^63-1 bytes")
            return self._put_image(nested, 0, nested.size * item.count, image, offset)
        assert isinstance(item, Slice)
        nested = self.evaluate(item.expr, scope)
        end = nested.size if item.end is None else item.end
        if not 0 <= item.start <= end <= nested.size:
            raise error(f"[{item.start}:{'' if item.end is None else item.end}] does not describe a valid slice "
                        f"of {nested.size} bytes")
        return self._put_image(nested, item.start, end - item.start, image, offset)

    @staticmethod
    def _put_image(nested: Image, skip: int, length: int, image: Image, offset: int) -> int:
        if nested.size:
            image.put(offset, length, Tiled(nested), skip)
        else:
            image.put(offset, length, None)
        return offset + length

    @staticmethod
    def _put_bytes(data: bytes, image: Image, offset: int) -> int:
        image.put(offset, len(data), Literal(data))
        return offset + len(data)

    def _file(self, path: str, start: int, end: int | None, image: Image, offset: int) -> int:
        """<FILE or <FILE[N:M]: as nbdkit, a slice past the end of the file gives what there is."""
        if start < 0 or (end is not None and end < start):
            raise error("<FILE[N:M] does not describe a valid slice")
        try:
            with open(path, "rb") as f:
                info = os.fstat(f.fileno())
                if stat.S_ISREG(info.st_mode):
                    available = max(0, min(info.st_size, end if end is not None else info.st_size) - start)
                    image.put(offset, available, FileData(path), start)
                    return offset + available
                # A pipe or a device (/dev/urandom): read now, up to STREAM_LIMIT bytes.
                wanted = start + STREAM_LIMIT + 1 if end is None else end
                if wanted - start > STREAM_LIMIT + 1:
                    raise error(f"<{path}[{start}:{end}]: more than {STREAM_LIMIT} bytes from a pipe or device")
                data = f.read(wanted)[start:]
        except OSError as e:
            raise error(f"{path}: {e.strerror}") from None
        if len(data) > STREAM_LIMIT:
            raise error(f"<{path}: more than {STREAM_LIMIT} bytes (is it endless?): take a slice, <{path}[:N]")
        return self._put_bytes(data, image, offset)

    def _script(self, command: str, length: int | None) -> bytes:
        """<(SCRIPT): its output; with [:length] only that much, and its exit status is not checked
        (as nbdkit: an endless generator cut short usually dies of a broken pipe)."""
        limit = STREAM_LIMIT if length is None else length
        if limit > STREAM_LIMIT:
            raise error(f"<({command.strip()})[:{length}]: more than {STREAM_LIMIT} bytes from a script")
        try:
            result = _subprocess.run(["/bin/sh", "-c", command], stdout_limit=limit, timeout=SCRIPT_TIMEOUT,
                                     keep_first=length is not None)
        except _subprocess.ScriptFailed as e:
            raise error(f"<({command.strip()}): {e}") from None
        if length is None and result.status != 0:
            raise error(f"<({command.strip()}): external command failed: {result.describe()}")
        return result.stdout


def evaluate(expr: Expr) -> Image:
    try:
        return Evaluator().evaluate(expr)
    except RecursionError:
        raise error("names refer to names too deeply to evaluate") from None


def store_image(image: Image, size: int, store: SparsePages | WholeBuffer) -> None:
    """Write [0, size) of the image into the store, as nbdkit's evaluation leaves its allocator."""
    nested: list[tuple[int, int]] = []
    for run in image.runs:
        if run.start >= size:
            break
        stop = min(size, run.end)
        for offset, data in _run_pieces(run, run.start, stop):
            store.write(memoryview(data), offset)
        if isinstance(run.source, Tiled):
            nested.append((run.start, stop))
    if isinstance(store, SparsePages) and nested:
        # A nested image is copied in as nbdkit blits: pages it leaves all zero are freed.
        starts = [start for start, _ in nested]
        for index in sorted(store.pages):
            page_start = index * PAGE
            where = bisect.bisect_right(starts, page_start + PAGE - 1) - 1
            if where >= 0 and nested[where][1] > page_start and store.page_is_zero(index):
                store.free(index)


def check_fits(image: Image, memory: int) -> None:
    needed = image.pages * PAGE
    if needed > memory:
        raise ConfigError(f"data: the expression makes up to {needed} bytes of data, more than this machine's "
                          f"{memory} bytes of memory")
