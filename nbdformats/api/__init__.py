"""What a plugin or filter author imports: `from nbdformats.api import Plugin, PluginHandle, Param, Size`.

The names live in api/chain.py (the chain, handles, layers, flags), api/params.py (typed
parameters), api/errors.py, api/zeroes.py (zero buffers and ranges), api/progress.py (start-up
progress bars), api/status.py (background work in --stats-json) and api/syscalls.py (fallocate); docs/api.md is the reference.
"""

from .chain import (DEFAULT_EXPORT, EMULATE, EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, FLAG_FAST_ZERO, FLAG_FUA, FLAG_MAY_TRIM,
                    FLAG_REQ_ONE, NATIVE, NONE, Export, Extents, Filter, FilterHandle, Holes, Layer, Plugin, PluginHandle,
                    ThreadModel, current_client, current_tls, extents_aligned, request_shutdown, sleep,
                    stdio_safe)
from .errors import ConfigError, NBDError
from .params import Bool, Enum, Float, Int, Param, ParamType, Path, Secret, SecretValue, Size, String
from .progress import progress
from .status import report_status, withdraw_status
from .zeroes import fill_zero, is_zero, write_zeroes

__all__ = [
    "DEFAULT_EXPORT", "EMULATE", "EXTENT_DATA", "EXTENT_HOLE", "EXTENT_ZERO", "FLAG_FAST_ZERO", "FLAG_FUA", "FLAG_MAY_TRIM",
    "FLAG_REQ_ONE", "NATIVE", "NONE", "Export", "Extents", "Filter", "FilterHandle", "Holes", "Layer", "Plugin",
    "PluginHandle", "ThreadModel", "current_client", "current_tls", "extents_aligned",
    "request_shutdown", "sleep", "stdio_safe",
    "ConfigError", "NBDError", "Bool", "Enum", "Float", "Int", "Param", "ParamType", "Path",
    "Secret", "SecretValue", "Size", "String", "progress", "report_status", "withdraw_status", "fill_zero", "is_zero", "write_zeroes",
]
