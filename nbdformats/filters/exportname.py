"""exportname filter: change the export names a client sees (nbdkit-exportname-filter compatible).

default-export= names what "" stands for; exportname-list= chooses what NBD_OPT_LIST advertises
(the plugin's list, an error, nothing, the default only, or the exportname= names);
exportname-strict=true refuses names not given with exportname=; exportdesc= replaces the
descriptions (none, a fixed string, or the output of a script run with $name set).
"""

from __future__ import annotations

import errno
import logging
from typing import Callable

from ..api.chain import Export, Filter, FilterHandle, Layer, OpenNext
from ..api.errors import NBDError
from ..api.params import Bool, Enum, Param, ParamType, String
from ..plugins import _subprocess

log = logging.getLogger(__name__)

DESCRIPTION_LIMIT = 4096  # the longest string NBD carries; longer script output is cut
SCRIPT_TIMEOUT = 60


class DescriptionMode(ParamType):
    """keep, none, fixed:STRING or script:SCRIPT, as (mode, text)."""

    metavar = "keep|none|fixed:STRING|script:SCRIPT"

    def parse(self, text: str) -> tuple[str, str]:
        if text in ("keep", "none"):
            return text, ""
        mode, colon, rest = text.partition(":")
        if colon and mode in ("fixed", "script"):
            return mode, rest
        raise ValueError(f"unrecognized exportdesc mode (use {self.metavar})")


class ExportnameFilter(Filter):
    """Change the default export, the advertised list of exports and their descriptions."""

    name = "exportname"
    default_export_name = Param(String(), key="default-export",
                                help="The export that \"\" stands for (empty: the plugin's default)")
    exportname_list = Param(Enum("keep", "error", "empty", "defaultonly", "default-only", "explicit"), default="keep",
                            help="What NBD_OPT_LIST shows: the plugin's list (keep), an error, nothing, the default "
                                 "export only, or the exportname= names (explicit)")
    exportname_strict = Param(Bool(), default=False,
                              help="true: refuse clients asking for a name not given with exportname=")
    exportname = Param(String(), repeat=True, help="A name for exportname-list=explicit and exportname-strict "
                                                   "(repeatable)")
    exportdesc = Param(DescriptionMode(), default=("keep", ""),
                       help="Descriptions: the plugin's (keep), none, fixed:STRING, or the output of "
                            "script:SCRIPT run with $name set to the export name")

    def description(self, name: str, original: str) -> str:
        mode, text = self.exportdesc
        if mode == "keep":
            return original
        if mode != "script":
            return text
        command = f"export name; name={_subprocess.shell_quote(name)}\n{text}\n"
        try:
            result = _subprocess.run(["/bin/sh", "-c", command], stdout_limit=DESCRIPTION_LIMIT,
                                     timeout=SCRIPT_TIMEOUT, keep_first=True)
        except _subprocess.ScriptFailed as e:
            log.debug("exportdesc script: %s", e)
            return ""
        return result.stdout.removesuffix(b"\n").decode(errors="replace")

    def list_exports(self, next_list: Callable[[bool, bool], list[Export]], readonly: bool,
                     is_tls: bool) -> list[Export]:
        mode = self.exportname_list
        if mode == "error":
            raise NBDError(errno.EPERM, "export list restricted by policy")
        if mode == "empty":
            return []
        if mode in ("defaultonly", "default-only"):
            exports = [Export(self.default_export_name or "")]  # "": the plugin's default export
        elif mode == "explicit":
            exports = [Export(name) for name in self.exportname]
        else:
            exports = next_list(readonly, is_tls)
        return [Export(e.name, self.description(e.name, e.description)) for e in exports]

    def default_export(self, next_default: Callable[[bool, bool], str], readonly: bool, is_tls: bool) -> str:
        if self.exportname_strict:
            if "" not in self.exportname:
                raise NBDError(errno.ENOENT, "exportname: the default export is not one of the exportname= names")
            return self.default_export_name or ""
        if self.default_export_name is not None:  # given, even empty: it is the answer (nbdkit)
            return self.default_export_name
        return next_default(readonly, is_tls)

    def open(self, next_open: OpenNext, readonly: bool, export_name: str) -> FilterHandle:
        if self.exportname_strict and export_name not in self.exportname:
            raise NBDError(errno.ENOENT, f"exportname: export {export_name!r} not found")
        return super().open(next_open, readonly, export_name)

    class Handle(FilterHandle):
        filter: "ExportnameFilter"

        def __init__(self, filter: "ExportnameFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            self.export_name = export_name

        def export_description(self) -> str | None:
            keep = self.filter.exportdesc[0] == "keep"
            description = self.filter.description(self.export_name, (self.next.export_description() or "")
                                                  if keep else "")
            return description or None


FILTER = ExportnameFilter
