"""NBD protocol numbers (the NBD spec's ``proto.md``), shared by our client and server.

Only facts live here: magic numbers, option/command/reply codes, flag bits, QEMU's limits,
and the names QEMU prints for them in its error messages (``nbd_opt_lookup`` and friends).
"""

from __future__ import annotations

import errno
import struct

# --- handshake ---------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x0003E889045565A9
OLD_STYLE_MAGIC = 0x00420281861253

# handshake flags (server) / client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = FLAG_FIXED_NEWSTYLE
FLAG_C_NO_ZEROES = FLAG_NO_ZEROES

# options
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

OPT_NAMES = {
    OPT_EXPORT_NAME: "export name", OPT_ABORT: "abort", OPT_LIST: "list",
    OPT_STARTTLS: "starttls", OPT_INFO: "info",
    OPT_GO: "go", OPT_STRUCTURED_REPLY: "structured reply",
    OPT_LIST_META_CONTEXT: "list meta context", OPT_SET_META_CONTEXT: "set meta context",
}


def opt_name(opt: int) -> str:
    """QEMU's ``nbd_opt_lookup`` (7.2 has no name for PEEK_EXPORT: "<unknown>")."""
    return OPT_NAMES.get(opt, "<unknown>")


# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_BIT = 1 << 31
REP_ERR_UNSUP = REP_ERR_BIT | 1
REP_ERR_POLICY = REP_ERR_BIT | 2
REP_ERR_INVALID = REP_ERR_BIT | 3
REP_ERR_PLATFORM = REP_ERR_BIT | 4
REP_ERR_TLS_REQD = REP_ERR_BIT | 5
REP_ERR_UNKNOWN = REP_ERR_BIT | 6
REP_ERR_SHUTDOWN = REP_ERR_BIT | 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR_BIT | 8
REP_ERR_TOO_BIG = REP_ERR_BIT | 9

# NBD_OPT_INFO / NBD_OPT_GO information types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# --- transmission --------------------------------------------------------------------------
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# transmission (export) flags
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

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_NAMES = {CMD_READ: "read", CMD_WRITE: "write", CMD_DISC: "disconnect",
             CMD_FLUSH: "flush", CMD_TRIM: "trim", CMD_CACHE: "cache",
             CMD_WRITE_ZEROES: "write zeroes", CMD_BLOCK_STATUS: "block status"}


def cmd_name(cmd: int) -> str:
    """QEMU's ``nbd_cmd_lookup``."""
    return CMD_NAMES.get(cmd, "<unknown>")


# command flags
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply chunks
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# block status flags
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
STATE_DIRTY = 1 << 0

# QEMU's meta context ids (fixed: base 0, depth 1, bitmaps from 2)
META_ID_BASE_ALLOCATION = 0
META_ID_ALLOCATION_DEPTH = 1
META_ID_DIRTY_BITMAP = 2

# --- QEMU's limits ---------------------------------------------------------------------------
MAX_BUFFER_SIZE = 32 << 20          # NBD_MAX_BUFFER_SIZE: options and READ/WRITE payloads
MAX_STRING_SIZE = 4096              # NBD_MAX_STRING_SIZE: names, descriptions, contexts
MAX_BLOCK_STATUS_EXTENTS = (1 << 20) // 8   # NBD_MAX_BLOCK_STATUS_EXTENTS
REQUEST_MAX_BYTES = 0x7FFFFE00      # BDRV_REQUEST_MAX_BYTES (INT_MAX aligned down to 512)

# --- errors ------------------------------------------------------------------------------------
NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL = 1, 5, 12, 22
NBD_ENOSPC, NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN = 28, 75, 95, 108

_TO_WIRE = {errno.EPERM: NBD_EPERM, errno.EROFS: NBD_EPERM, errno.EIO: NBD_EIO,
            errno.ENOMEM: NBD_ENOMEM, errno.ENOSPC: NBD_ENOSPC, errno.EDQUOT: NBD_ENOSPC,
            errno.EFBIG: NBD_ENOSPC, errno.EOVERFLOW: NBD_EOVERFLOW,
            errno.ENOTSUP: NBD_ENOTSUP, errno.ESHUTDOWN: NBD_ESHUTDOWN}

_FROM_WIRE = {NBD_EPERM: errno.EPERM, NBD_EIO: errno.EIO, NBD_ENOMEM: errno.ENOMEM,
              NBD_EINVAL: errno.EINVAL, NBD_ENOSPC: errno.ENOSPC,
              NBD_EOVERFLOW: errno.EOVERFLOW, NBD_ENOTSUP: errno.ENOTSUP,
              NBD_ESHUTDOWN: errno.ESHUTDOWN}


def errno_to_wire(err: int) -> int:
    """``system_errno_to_nbd_errno``: anything unlisted travels as EINVAL."""
    return _TO_WIRE.get(err, NBD_EINVAL)


def wire_to_errno(err: int) -> int:
    """What a client makes of a wire error (the spec: unknown values mean EINVAL)."""
    return _FROM_WIRE.get(err, errno.EINVAL)


# --- struct layouts ----------------------------------------------------------------------------
HANDSHAKE = struct.Struct(">QQH")          # NBDMAGIC, IHAVEOPT, handshake flags
OPTION_HEADER = struct.Struct(">QII")      # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")      # magic, option, reply type, length
REQUEST = struct.Struct(">IHHQQI")         # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")       # magic, error, handle
CHUNK_HEADER = struct.Struct(">IHHQI")     # magic, flags, type, handle, length
