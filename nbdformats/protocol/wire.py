"""NBD wire constants and fixed-size codecs (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md).

All integers are big-endian ("network byte order").  Nothing here touches a socket.
"""

from __future__ import annotations

import errno
import struct

# -- Handshake -------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OLDSTYLE_MAGIC = 0x00420281861253
OPTION_REPLY_MAGIC = 0x3E889045565A9

# Handshake flags (server) / client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAG_FIXED_NEWSTYLE = 1 << 0
CLIENT_FLAG_NO_ZEROES = 1 << 1

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# Option reply types; errors have bit 31 set.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_PLATFORM = (1 << 31) + 4
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
REP_ERR_TOO_BIG = (1 << 31) + 9
REP_ERR_EXT_HEADER_REQD = (1 << 31) + 10

# NBD_OPT_INFO / NBD_OPT_GO information types.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Transmission flags.
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11
TF_BLOCK_STATUS_PAYLOAD = 1 << 12

# -- Transmission ----------------------------------------------------------------------------
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_RESIZE = 8
COMMAND_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
                 CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
                 CMD_BLOCK_STATUS: "BLOCK_STATUS", CMD_RESIZE: "RESIZE"}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
CMD_FLAG_PAYLOAD_LEN = 1 << 5

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_BLOCK_STATUS_EXT = 6
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# Error values on the wire ("the same as Linux errno values", but only these are allowed).
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

_ERRNO_TO_NBD = {
    errno.EPERM: NBD_EPERM, errno.EROFS: NBD_EPERM, errno.EACCES: NBD_EPERM,
    errno.EIO: NBD_EIO, errno.ENOMEM: NBD_ENOMEM, errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC, errno.EDQUOT: NBD_ENOSPC, errno.EFBIG: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW, errno.ENOTSUP: NBD_ENOTSUP, errno.EOPNOTSUPP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def errno_to_nbd(err: int) -> int:
    """Map a host errno to the protocol's small error set (unknown errors become EIO)."""
    return _ERRNO_TO_NBD.get(err, NBD_EIO)


# Fixed layouts.
GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
OLDSTYLE_GREETING = struct.Struct(">QQQI124x")  # NBDMAGIC, OLDSTYLE_MAGIC, size, flags, zeroes
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+ 124 zeroes unless NO_ZEROES)
INFO_EXPORT_PAYLOAD = struct.Struct(">HQH")  # INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE_PAYLOAD = struct.Struct(">HIII")  # INFO_BLOCK_SIZE, minimum, preferred, maximum

REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
EXTENDED_REQUEST = struct.Struct(">IHHQQQ")  # magic, flags, type, cookie, offset, length (64-bit)
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
EXTENDED_REPLY = struct.Struct(">IHHQQQ")  # magic, flags, type, cookie, offset, payload length
# A chunk of type NBD_REPLY_TYPE_OFFSET_DATA starts with the offset of its data: header and offset in one.
STRUCTURED_DATA_HEADER = struct.Struct(">IHHQIQ")
EXTENDED_DATA_HEADER = struct.Struct(">IHHQQQQ")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
HOLE_PAYLOAD = struct.Struct(">QI")  # offset, hole size
ERROR_PAYLOAD = struct.Struct(">IH")  # error, message length (message follows)
BLOCK_DESCRIPTOR = struct.Struct(">II")  # extent length, status flags
BLOCK_DESCRIPTOR_EXT = struct.Struct(">QQ")
BLOCK_STATUS_EXT_HEADER = struct.Struct(">II")  # context id, descriptor count

BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

MAX_STRING = 4096  # "MUST be no longer than 4096 bytes"


def feed(decoder, data: bytes) -> list:
    """Copy `data` into a BufferedProtocol-shaped decoder (get_buffer/buffer_updated), as the event
    loop would; returns what the decoder yields.  For bytes that arrive by other means."""
    results: list = []
    view = memoryview(data)
    while view:
        buf = decoder.get_buffer()
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        view = view[n:]
        results += decoder.buffer_updated(n)
    return results
