"""S3 plugin: a disk in Amazon S3 or an S3-compatible store (Ceph radosgw, MinIO ...).

Parameters and object layout follow nbdkit's S3 plugin, so a disk written by one server reads
back through the other:

- single object (`key=` names it): a read-only disk the size of the object, served by ranged
  GETs, with read-ahead for sequential readers;
- many objects (`size=` and `object-size=`): a writable disk whose bytes
  [i * object-size, (i + 1) * object-size) live in the object `KEY/%016x` % i.  A missing
  object reads as zeroes and is reported as a hole; writes that leave an object all zero,
  zero requests and trims delete it, so the bucket stays sparse.

Every write is a completed PUT or DELETE before it is acknowledged, so flush has nothing to
do and FUA is free.  Partial-object writes read, patch and rewrite the object under a lock
per object shared by all connections (multi-conn safe within one server).  Requests that span
several objects run in parallel, at most `connections=` HTTP requests at a time.

boto3 is the client, as in nbdkit: credentials come from the parameters or boto3's usual
chain (AWS_* variables, ~/.aws/credentials and AWS_PROFILE, instance roles).  A boto3 reduced to
the calls nbdkit's plugin makes (boto3.client, get_object, list_objects_v2, as nbdkit's test
double) works too: without boto3.session or botocore.config the client is made as nbdkit makes
it (timeout=, retries= and addressing-style= are then not applied; connections= still limits
the requests in flight), without head_object the size comes from a GET's Content-Length header
and reads are not ETag-checked, without head_bucket a listing checks the bucket, and a body
without readinto is read whole.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

from ..api.chain import (EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, NATIVE, Extents, Plugin,
                         PluginHandle)
from ..api.errors import ConfigError, NBDError
from ..api.params import Enum, Float, Int, Param, Secret, SecretValue, Size, String

MiB = 1024 * 1024
MAX_OBJECT_SIZE = 5 * 1024 * MiB  # the largest single PUT S3 accepts
LARGE_READ = 4 * MiB  # single-object reads larger than this are split into parallel GETs
READAHEAD_WINDOWS = 4  # windows kept per connection (the one being read, the one prefetched, ...)
DELETE_BATCH = 1000  # keys per DeleteObjects request (the S3 limit)
OBJECT_NAME = re.compile(r"[0-9a-f]{16}")
# The errors of the connection that nbdkit's plugin catches, for a botocore without BotoCoreError.
CONNECTION_ERRORS = ("ReadTimeoutError", "ConnectTimeoutError", "ConnectionClosedError")

log = logging.getLogger("nbdformats")


class S3Plugin(Plugin):
    """A disk stored in S3: one object read-only, or many fixed-size objects read-write."""

    name = "S3"
    latency_bound = True

    access_key = Param(Secret(), help="Access key ID (or +FILE, -FD, -); default: boto3's credential chain")
    secret_key = Param(Secret(), help="Secret access key (or +FILE, -FD, -)")
    session_token = Param(Secret(), help="Session token for temporary credentials (or +FILE, -FD, -)")
    endpoint_url = Param(String(), help="Endpoint of an S3-compatible store, e.g. http://127.0.0.1:7480")
    bucket = Param(String(), required=True, help="The bucket holding the object(s)")
    key = Param(String(), required=True,
                help="The object (single-object mode) or the prefix of the objects (with size=)")
    size = Param(Size(minimum=1), help="Disk size in multi-object mode (with object-size=)")
    object_size = Param(Size(minimum=1, maximum=MAX_OBJECT_SIZE),
                        help="Bytes per object in multi-object mode (with size=)")
    addressing_style = Param(Enum("auto", "path", "virtual"), default="auto",
                             help="path: http://HOST/BUCKET/KEY, as S3-compatible stores often need")
    connections = Param(Int(1, 1024), default=16, help="At most this many HTTP requests at a time")
    readahead = Param(Size(maximum=256 * MiB), default=4 * MiB,
                      help="Single-object mode: sequential reads fetch windows of this size ahead (0: off)")
    timeout = Param(Float(minimum=0.1), default=60.0, help="Seconds to wait to connect or for data")
    retries = Param(Int(0, 20), default=2, help="Retries of a failed request (boto3's standard mode)")

    def config_complete(self) -> None:
        if (self.size is None) != (self.object_size is None):
            raise ConfigError("S3: size= and object-size= must be given together")
        if self.size is not None and self.size % self.object_size:
            raise ConfigError("S3: size= must be a multiple of object-size=")
        if self.secret_key is not None and self.access_key is None:
            raise ConfigError("S3: secret-key= needs access-key=")

    @property
    def multi_object(self) -> bool:
        return self.object_size is not None

    def get_ready(self) -> None:
        self.s3 = self._client()
        self.slots = threading.BoundedSemaphore(self.connections)
        self.executor = ThreadPoolExecutor(self.connections, thread_name_prefix="s3")
        self.object_locks = KeyedLock()
        # Fail now, with a clear message, on a wrong key, bucket or object.
        if self.multi_object:
            self._check("", self.head_bucket)
        else:
            self._check(self.key, self.head)

    def cleanup(self) -> None:
        executor = getattr(self, "executor", None)
        if executor is not None:
            executor.shutdown(wait=True)

    def _client(self) -> Any:
        try:
            import boto3
            from botocore import exceptions
            self.ClientError = exceptions.ClientError
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"S3: the boto3 module is needed ({e}); pip install boto3") from None
        self.BotoCoreError = getattr(exceptions, "BotoCoreError", None) or tuple(
            getattr(exceptions, name) for name in CONNECTION_ERRORS if hasattr(exceptions, name))

        def reveal(secret: SecretValue | None) -> str | None:
            return None if secret is None else secret.reveal().decode()

        arguments = dict(endpoint_url=self.endpoint_url or None,
                         aws_access_key_id=reveal(self.access_key), aws_secret_access_key=reveal(self.secret_key),
                         aws_session_token=reveal(self.session_token))
        try:
            from botocore.config import Config
            Session = boto3.session.Session
        except (ImportError, AttributeError):
            # Only what nbdkit's plugin calls: boto3.client(), with nbdkit's arguments.
            log.debug("S3: boto3 has no session or botocore no config: a plain boto3.client(), as nbdkit's; "
                      "timeout=, retries= and addressing-style= are not applied")
            try:
                return boto3.client("s3", **arguments)
            except Exception as e:
                raise ConfigError(f"S3: cannot make a client: {e}") from None

        config = Config(
            max_pool_connections=self.connections,
            connect_timeout=self.timeout, read_timeout=self.timeout,
            retries={"mode": "standard", "total_max_attempts": self.retries + 1},
            s3={"addressing_style": self.addressing_style},
            # Ranged GETs carry no whole-object checksum; skipping validation saves CPU per request.
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
            parameter_validation=False)
        try:
            return Session().client("s3", config=config, **arguments)
        except Exception as e:  # botocore raises several unrelated types for a bad URL or profile
            raise ConfigError(f"S3: cannot make a client: {e}") from None

    def _check(self, key: str, call: Callable[[], Any]) -> Any:
        """Run a start-up request; turn failures into a ConfigError that says what is wrong."""
        try:
            with self.request(key, "start-up check"):
                return call()
        except NBDError as e:
            if e.errno != errno.ENOENT:
                raise ConfigError(str(e)) from None
            if not key or not self._bucket_exists():
                raise ConfigError(f"S3: bucket {self.bucket!r} does not exist") from None
            raise ConfigError(f"S3: object s3://{self.bucket}/{key} does not exist") from None

    def head_bucket(self) -> None:
        """Whether the bucket is there and ours: a HEAD, or a listing of one key with a client
        that has no head_bucket (only nbdkit's calls)."""
        head_bucket = getattr(self.s3, "head_bucket", None)
        if head_bucket is None:
            self.s3.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.key}/", MaxKeys=1)
        else:
            head_bucket(Bucket=self.bucket)

    def _bucket_exists(self) -> bool:
        try:
            self.head_bucket()
        except self.ClientError as e:
            return str(e.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket")
        return True

    def head(self) -> tuple[int, str | None]:
        """(length, ETag) of the single object.  A client without head_object (nbdkit's test
        double) gets the length from a GET's headers, as nbdkit does, and no ETag."""
        head_object = getattr(self.s3, "head_object", None)
        if head_object is None:
            response = self.s3.get_object(Bucket=self.bucket, Key=self.key)
            body = response.get("Body")
            if body is not None:
                body.close()
            return int(response["ResponseMetadata"]["HTTPHeaders"]["content-length"]), None
        response = head_object(Bucket=self.bucket, Key=self.key)
        return int(response["ContentLength"]), response["ETag"]

    def object_name(self, index: int) -> str:
        return f"{self.key}/{index:016x}"

    @contextlib.contextmanager
    def request(self, key: str, what: str) -> Iterator[None]:
        """One HTTP request: waits for a free connection, maps botocore's errors to NBDError."""
        with self.slots:
            try:
                yield
            except self.ClientError as e:
                raise _client_error(e, self.bucket, key, what) from None
            except self.BotoCoreError as e:
                raise NBDError(errno.EIO, f"S3 {what} s3://{self.bucket}/{key}: {e}") from None

    def get_into(self, key: str, offset: int, buf: memoryview, etag: str | None = None) -> bool:
        """Fill buf from bytes [offset, offset + len(buf)) of an object; False if it does not exist.

        With `etag` the GET is conditional (If-Match): a replaced object fails the read instead
        of mixing two versions in one disk.
        """
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key,
                                "Range": f"bytes={offset}-{offset + len(buf) - 1}"}
        if etag is not None:
            args["IfMatch"] = etag
        with self.request(key, "read"):
            try:
                response = self.s3.get_object(**args)
            except self.ClientError as e:
                if e.response.get("Error", {}).get("Code") == "NoSuchKey":
                    return False
                raise
            with contextlib.closing(response["Body"]) as body:
                length = response.get("ContentLength")
                readinto = getattr(body, "readinto", None)
                if readinto is None:  # a body that only reads (nbdkit's test double): read it whole
                    data = body.read()
                    length = len(data)
                if length is not None and length != len(buf):
                    raise NBDError(errno.EIO, f"S3 read s3://{self.bucket}/{key}: asked for {len(buf)} bytes "
                                              f"at {offset}, the server sends {length}")
                if readinto is None:
                    buf[:] = data
                    return True
                done = 0
                while done < len(buf):
                    n = readinto(buf[done:])
                    if not n:
                        raise NBDError(errno.EIO, f"S3 read s3://{self.bucket}/{key}: connection closed "
                                                  f"after {done} of {len(buf)} bytes")
                    done += n
        return True

    def put(self, key: str, data: bytes | bytearray) -> None:
        with self.request(key, "write"):
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start:start + DELETE_BATCH]
            with self.request(batch[0], "delete"):
                response = self.s3.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            if response.get("Errors"):
                first = response["Errors"][0]
                raise NBDError(errno.EIO, f"S3 delete s3://{self.bucket}/{first.get('Key')}: "
                                          f"{first.get('Code')} {first.get('Message') or ''}".rstrip())

    def existing_objects(self, first: int, end: int) -> Iterator[int]:
        """Indexes of the objects in [first, end) that exist, ascending (a listing of the prefix)."""
        prefix = f"{self.key}/"
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": min(1000, end - first)}
        if first:
            args["StartAfter"] = self.object_name(first - 1)
        while True:
            with self.request(prefix, "list"):
                response = self.s3.list_objects_v2(**args)
            for item in response.get("Contents", ()):
                name = item["Key"][len(prefix):]
                if OBJECT_NAME.fullmatch(name):
                    index = int(name, 16)
                    if index >= end:
                        return
                    yield index
            if not response.get("IsTruncated"):
                return
            args["ContinuationToken"] = response["NextContinuationToken"]

    def run_parallel(self, calls: list[Callable[[], Any]]) -> list[Any]:
        """Run calls on the plugin's workers; wait for all of them, then raise the first error.

        Waiting for all means no request still runs when the client gets its reply.
        """
        if len(calls) == 1:
            return [calls[0]()]
        futures = [self.executor.submit(call) for call in calls]
        results, error = [], None
        for future in futures:
            try:
                results.append(future.result())
            except BaseException as e:
                error = error or e
        if error is not None:
            raise error
        return results

    class Handle(PluginHandle):
        def __init__(self, plugin: "S3Plugin", readonly: bool, export_name: str) -> None:
            self.plugin = plugin
            if plugin.multi_object:
                self.disk: SingleObject | ObjectSet = ObjectSet(plugin)
            else:
                self.disk = SingleObject(plugin)

        def get_size(self) -> int:
            return self.disk.size

        def block_size(self) -> tuple[int, int, int]:
            return 1, self.disk.preferred_block, 0xFFFFFFFF

        def can_write(self) -> bool:
            return self.plugin.multi_object

        def can_multi_conn(self) -> bool:
            return True  # writes are durable when acknowledged; partial writes lock across connections

        def can_fua(self) -> int:
            return NATIVE

        def can_fast_zero(self) -> bool:
            return True  # whole objects are deleted; partial ones cost what writing zeroes would

        def can_extents(self) -> bool:
            return self.plugin.multi_object

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            self.disk.pread(buf, offset)

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            self.writable_disk().pwrite(buf, offset)

        def flush(self, flags: int) -> None:
            pass  # every acknowledged write is a completed PUT or DELETE

        def zero(self, count: int, offset: int, flags: int) -> None:
            self.writable_disk().zero(count, offset)

        def trim(self, count: int, offset: int, flags: int) -> None:
            self.writable_disk().trim(count, offset)

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            self.writable_disk().extents(count, offset, extents)  # can_extents: only a set of objects

        def writable_disk(self) -> "ObjectSet":
            """The disk of many objects (a single object is read-only: can_write says so)."""
            assert isinstance(self.disk, ObjectSet)
            return self.disk


class SingleObject:
    """One object, read-only, with read-ahead for sequential readers (one per connection)."""

    preferred_block = 512 * 1024

    def __init__(self, plugin: S3Plugin) -> None:
        self.plugin = plugin
        # Each connection sees the object as it is when it connects; reads are conditional on
        # this ETag, so a replaced object fails reads rather than serving a mix.
        with plugin.request(plugin.key, "open"):
            self.size, self.etag = plugin.head()
        self.window = plugin.readahead
        self.windows: OrderedDict[int, _Window] = OrderedDict()
        self.lock = threading.Lock()
        self.last_end = -1

    def pread(self, buf: memoryview, offset: int) -> None:
        count = len(buf)
        if count == 0:
            return
        window = self.window
        if window and count < window:
            first, last = offset // window, (offset + count - 1) // window
            with self.lock:
                sequential = offset == self.last_end or first in self.windows
                self.last_end = offset + count
                if sequential:
                    windows = [self._window_locked(index) for index in range(first, last + 1)]
                    if (last + 1) * window < self.size:
                        self._window_locked(last + 1)  # prefetch: the reader will want it next
            if sequential:
                self._copy_from_windows(buf, offset, first, windows)
                return
        self._get(buf, offset)

    def _get(self, buf: memoryview, offset: int) -> None:
        """Direct ranged GETs: one, or several in parallel for a large read."""
        plugin = self.plugin
        pieces = [(start, min(LARGE_READ, len(buf) - start)) for start in range(0, len(buf), LARGE_READ)]
        plugin.run_parallel([functools.partial(self._get_exact, buf[start:start + n], offset + start)
                             for start, n in pieces])

    def _get_exact(self, buf: memoryview, offset: int) -> None:
        if not self.plugin.get_into(self.plugin.key, offset, buf, self.etag):
            raise NBDError(errno.EIO, f"S3 read s3://{self.plugin.bucket}/{self.plugin.key}: "
                                      "the object was deleted")

    def _window_locked(self, index: int) -> "_Window":
        window = self.windows.get(index)
        if window is not None:
            self.windows.move_to_end(index)
            return window
        start = index * self.window
        data = bytearray(min(self.window, self.size - start))
        window = _Window(self.plugin.executor.submit(self._get_exact, memoryview(data), start), data)
        self.windows[index] = window
        while len(self.windows) > READAHEAD_WINDOWS:
            self.windows.popitem(last=False)  # a reader already holding it still gets its bytes
        return window

    def _copy_from_windows(self, buf: memoryview, offset: int, first: int, windows: list["_Window"]) -> None:
        done = 0
        for index, window in zip(range(first, first + len(windows)), windows):
            try:
                data = window.result()
            except BaseException:
                with self.lock:
                    if self.windows.get(index) is window:
                        del self.windows[index]  # the next reader retries
                raise
            start = offset + done - index * self.window
            n = min(len(buf) - done, len(data) - start)
            buf[done:done + n] = data[start:start + n]
            done += n


class _Window:
    """A read-ahead window: the bytes once the GET that fills them has finished."""

    __slots__ = ("future", "data")

    def __init__(self, future: Future, data: bytearray) -> None:
        self.future, self.data = future, data

    def result(self) -> bytearray:
        self.future.result()
        return self.data


class ObjectSet:
    """A disk of fixed-size objects KEY/%016x; missing objects are zeroes (holes)."""

    def __init__(self, plugin: S3Plugin) -> None:
        self.plugin = plugin
        self.size = plugin.size
        self.object_size = plugin.object_size
        block = self.object_size
        self.preferred_block = block if block & (block - 1) == 0 and 512 <= block <= 32 * MiB else 4096

    def pieces(self, offset: int, count: int) -> Iterator[tuple[int, int, int, int]]:
        """(object index, offset in the object, length, offset in the request) of each piece."""
        size = self.object_size
        done = 0
        while done < count:
            index, start = divmod(offset + done, size)
            n = min(size - start, count - done)
            yield index, start, n, done
            done += n

    def pread(self, buf: memoryview, offset: int) -> None:
        plugin = self.plugin

        def read(index: int, start: int, piece: memoryview) -> None:
            if not plugin.get_into(plugin.object_name(index), start, piece):
                piece[:] = bytes(len(piece))

        plugin.run_parallel([functools.partial(read, i, s, buf[d:d + n])
                             for i, s, n, d in self.pieces(offset, len(buf))])

    def pwrite(self, buf: memoryview, offset: int) -> None:
        self.plugin.run_parallel([functools.partial(self._write_object, i, s, buf[d:d + n])
                                  for i, s, n, d in self.pieces(offset, len(buf))])

    def _write_object(self, index: int, start: int, piece: memoryview) -> None:
        """Write piece at `start` in object `index`; an object left all zero is deleted instead."""
        plugin = self.plugin
        name = plugin.object_name(index)
        with plugin.object_locks(name):
            if len(piece) == self.object_size:
                data: bytes | bytearray = piece.tobytes()  # boto3 takes bytes, not memoryviews
            else:  # read, patch, rewrite
                data = bytearray(self.object_size)
                plugin.get_into(name, 0, memoryview(data))  # a missing object stays zeroes
                data[start:start + len(piece)] = piece
            if _is_zero(data):
                plugin.delete([name])
            else:
                plugin.put(name, data)

    def _zero_partial(self, index: int, start: int, count: int) -> None:
        plugin = self.plugin
        name = plugin.object_name(index)
        with plugin.object_locks(name):
            data = bytearray(self.object_size)
            if not plugin.get_into(name, 0, memoryview(data)):
                return  # already zeroes
            data[start:start + count] = bytes(count)
            if _is_zero(data):
                plugin.delete([name])
            else:
                plugin.put(name, data)

    def _delete_range(self, first: int, end: int) -> None:
        """Delete objects [first, end): by name when few, else those a listing finds."""
        plugin = self.plugin
        if end - first <= DELETE_BATCH:
            indexes: list[int] = list(range(first, end))
        else:
            indexes = list(plugin.existing_objects(first, end))
        if not indexes:
            return
        names = [plugin.object_name(i) for i in indexes]
        for name in names:
            plugin.object_locks.acquire(name)  # no partial write may be rewriting one of them
        try:
            plugin.delete(names)
        finally:
            for name in names:
                plugin.object_locks.release(name)

    def _whole_objects(self, offset: int, count: int) -> tuple[int, int]:
        size = self.object_size
        return -(-offset // size), (offset + count) // size

    def zero(self, count: int, offset: int) -> None:
        """Zero the partial objects at the edges, delete the whole ones between (which may be many)."""
        size = self.object_size
        head, head_start = divmod(offset, size)
        tail, tail_length = divmod(offset + count, size)
        if head == tail:
            edges = [(head, head_start, count)] if count else []
        else:
            edges = [(head, head_start, size - head_start)] if head_start else []
            edges += [(tail, 0, tail_length)] if tail_length else []
        calls: list[Callable[[], None]] = [functools.partial(self._zero_partial, i, s, n) for i, s, n in edges]
        first, end = self._whole_objects(offset, count)
        if first < end:
            calls.append(lambda: self._delete_range(first, end))
        if calls:
            self.plugin.run_parallel(calls)

    def trim(self, count: int, offset: int) -> None:
        first, end = self._whole_objects(offset, count)
        if first < end:  # trim is advisory: partial objects keep their bytes
            self._delete_range(first, end)

    def extents(self, count: int, offset: int, extents: Extents) -> None:
        size = self.object_size
        first = offset // size
        end = -(-(offset + count) // size)
        position = first
        for index in self.plugin.existing_objects(first, end):
            if index > position:
                extents.add(position * size, (index - position) * size, EXTENT_HOLE | EXTENT_ZERO)
            extents.add(index * size, size, EXTENT_DATA)
            position = index + 1
        if position < end:
            extents.add(position * size, (end - position) * size, EXTENT_HOLE | EXTENT_ZERO)


class KeyedLock:
    """Mutual exclusion per key for an unbounded set of keys (objects being rewritten)."""

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.changed = threading.Condition()

    def acquire(self, key: str) -> None:
        with self.changed:
            while key in self.held:
                self.changed.wait()
            self.held.add(key)

    def release(self, key: str) -> None:
        with self.changed:
            self.held.discard(key)
            self.changed.notify_all()

    @contextlib.contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        self.acquire(key)
        try:
            yield
        finally:
            self.release(key)


_ZERO_MiB = bytes(MiB)


def _is_zero(data: bytes | bytearray) -> bool:
    view = memoryview(data)
    return all(view[i:i + MiB] == _ZERO_MiB[:len(view[i:i + MiB])] for i in range(0, len(view), MiB))


_ERRNO_BY_CODE = {
    "NoSuchKey": errno.ENOENT, "NoSuchBucket": errno.ENOENT, "404": errno.ENOENT, "NotFound": errno.ENOENT,
    "AccessDenied": errno.EACCES, "403": errno.EACCES, "InvalidAccessKeyId": errno.EACCES,
    "SignatureDoesNotMatch": errno.EACCES, "ExpiredToken": errno.EACCES,
    "PreconditionFailed": errno.EIO, "412": errno.EIO,
}


def _client_error(e: Any, bucket: str, key: str, what: str) -> NBDError:
    """An NBDError that says what S3 answered, in words a user can act on."""
    error = e.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    where = f"s3://{bucket}/{key}"
    if code in ("PreconditionFailed", "412"):
        message = f"{where} was replaced since this connection opened it"
    elif code in ("NoSuchBucket",):
        message = f"bucket {bucket!r} does not exist"
    elif code in ("NoSuchKey", "404", "NotFound"):
        message = f"{where} does not exist"
    elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "AccessDenied", "ExpiredToken"):
        message = f"access to {where} denied ({code}): check access-key=, secret-key= and session-token="
    else:
        message = f"{where}: {code or status} {error.get('Message') or ''}".rstrip()
    return NBDError(_ERRNO_BY_CODE.get(code, errno.EIO), f"S3 {what}: {message}")


PLUGIN = S3Plugin
