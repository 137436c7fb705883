"""Sans-IO pieces of the curl plugin: header options, Content-Range, validators, URLs.

Pure functions over strings, tested on their own; nothing here touches the network.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import unquote, urlsplit, urlunsplit

# RFC 9110 5.6.2: field names are tokens.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")

# RFC 9110 14.4: Content-Range = range-unit SP ( range-resp / unsatisfied-range )
#   range-resp = incl-range "/" ( complete-length / "*" );  incl-range = first-pos "-" last-pos
#   unsatisfied-range = "*/" complete-length
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class ContentRange:
    first: int | None  # None for an unsatisfied range ("bytes */LENGTH")
    last: int | None
    total: int | None  # None when the server does not know ("/*")


def parse_content_range(value: str) -> ContentRange:
    """Parse a Content-Range header; ValueError if it is malformed or inconsistent."""
    match = _CONTENT_RANGE.match(value)
    if not match:
        raise ValueError(f"malformed Content-Range {value!r}")
    first, last, total = match.groups()
    parsed = ContentRange(None if first is None else int(first), None if last is None else int(last),
                          None if total == "*" else int(total))
    if parsed.first is None and parsed.total is None:
        raise ValueError(f"malformed Content-Range {value!r}")
    if parsed.first is not None:
        assert parsed.last is not None
        if parsed.last < parsed.first or (parsed.total is not None and parsed.last >= parsed.total):
            raise ValueError(f"impossible Content-Range {value!r}")
    return parsed


def parse_header_option(text: str) -> tuple[str, str | None]:
    """A `header=` value as curl reads it: `Name: value` adds, `Name:` removes, `Name;` sends empty.

    Returns (name, value) with value None for removal.  The message of the ValueError never
    contains the value (it may be a token).
    """
    colon, semicolon = text.find(":"), text.find(";")
    if colon < 0 and semicolon < 0:
        raise ValueError("a header must look like 'Name: value', 'Name:' or 'Name;'")
    if semicolon >= 0 and (colon < 0 or semicolon < colon):
        name, rest = text[:semicolon].strip(), text[semicolon + 1:].strip()
        if rest:
            raise ValueError(f"header {name!r}: 'Name;' sends an empty header and takes no value")
        value: str | None = ""
    else:
        name, rest = text[:colon].strip(), text[colon + 1:].strip()
        value = rest or None
    if not _TOKEN.match(name):
        raise ValueError(f"{name!r} is not a valid header name")
    if value is not None and any(c in value for c in "\r\n\0"):
        raise ValueError(f"header {name!r}: the value contains a line break or NUL")
    return name, value


def parse_header_lines(output: str) -> list[tuple[str, str | None]]:
    """The output of a header script: one `header=`-style line per header, blank lines skipped."""
    return [parse_header_option(line) for line in output.splitlines() if line.strip()]


def basic_auth(user: str, password: bytes) -> str:
    """The Authorization value for HTTP Basic authentication (RFC 7617, UTF-8)."""
    return "Basic " + base64.b64encode(user.encode() + b":" + password).decode("ascii")


def split_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """`http://user:pw@host/x` -> (`http://host/x`, user, pw), percent-decoded, as curl takes them."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, sep, password = userinfo.partition(":")
    return (urlunsplit(parts._replace(netloc=hostport)), unquote(user),
            unquote(password) if sep else None)


def redact_url(url: str) -> str:
    """A URL fit for messages: no user information, and the query (often a signature) hidden."""
    parts = urlsplit(url)
    hostport = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=hostport, query="…" if parts.query else "", fragment=""))


@dataclass(frozen=True)
class Validators:
    """What identifies one version of the object (RFC 9110 8.8): ETag and Last-Modified."""

    etag: str | None
    last_modified: str | None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> "Validators":
        return cls(headers.get("ETag"), headers.get("Last-Modified"))

    def differs(self, later: "Validators") -> str | None:
        """Why `later` (a response's validators) is another version than self, or None.

        A validator is compared only when both responses carry it.
        """
        if self.etag is not None and later.etag is not None and self.etag != later.etag:
            return f"ETag {self.etag} became {later.etag}"
        if (self.last_modified is not None and later.last_modified is not None
                and self.last_modified != later.last_modified):
            return f"Last-Modified {self.last_modified} became {later.last_modified}"
        return None
