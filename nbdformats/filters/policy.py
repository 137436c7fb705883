"""policy filter: allow or deny requests by operation, range, size, export name and client.

`--filter=policy policy=FILE`.  FILE holds one rule a line ('#' starts a comment)::

    allow|deny OPERATIONS [CONDITION ...]
    readonly [CONDITION ...]
    default allow|deny

OPERATIONS is a comma list of read, write, zero, trim, flush, cache, extents (block status),
resize, `writes` (write, zero, trim, resize), `connect` (judged before the handshake), `open`
(judged when the client names an export) or `*` (all of them).  The CONDITIONS of a rule must
all hold: `range=START-END[,...]` (the request overlaps [START, END); `START-` runs to the end),
`size>N`, `size>=N`, `size<N`, `size<=N` (request length), `export=GLOB[,...]`,
`client=CIDR|ADDRESS|unix[,...]`.  The first matching rule decides; a denied request fails with
EPERM and a log line.  `readonly` rules open matching exports read-only (clients see the flag).
A data request no rule matches follows `default` (allow unless the file says `default deny`);
connect and open are allowed unless a rule denies them.  Rules are checked at start-up.
"""

from __future__ import annotations

import errno
import fnmatch
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..api.chain import Filter, FilterHandle, Holes, Layer, current_client
from ..api.errors import ConfigError, NBDError
from ..api.params import Param, Path, parse_size

log = logging.getLogger("nbdformats")

DATA_OPERATIONS = ("read", "write", "zero", "trim", "flush", "cache", "extents", "resize")
OPERATIONS = (*DATA_OPERATIONS, "connect", "open")
ALIASES = {"*": DATA_OPERATIONS + ("connect", "open"), "all": DATA_OPERATIONS + ("connect", "open"),
           "writes": ("write", "zero", "trim", "resize")}
ACTIONS = ("allow", "deny")
# Conditions each operation can be judged on: the others never match it (a flush has no range).
RANGED = {"read", "write", "zero", "trim", "cache", "extents"}

LOG_BURST = 20  # refusals logged at once per connection, then about one a second
UNIX_CLIENT = "unix"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Rule:
    line: int
    text: str
    action: str
    operations: frozenset[str]
    ranges: tuple[tuple[int, int | None], ...] = ()
    size_checks: tuple[tuple[str, int], ...] = ()
    exports: tuple[str, ...] = ()
    clients: tuple[Network | str, ...] = ()

    def matches_connection(self, client: ipaddress.IPv4Address | ipaddress.IPv6Address | str | None,
                           export: str | None) -> bool:
        """Whether the client and export conditions hold (None: not known yet, never matches)."""
        if self.clients and not any(_client_in(client, spec) for spec in self.clients):
            return False
        if self.exports and (export is None or not any(fnmatch.fnmatchcase(export, g) for g in self.exports)):
            return False
        return True

    def matches_request(self, operation: str, offset: int, count: int) -> bool:
        if operation not in self.operations:
            return False
        if (self.ranges or self.size_checks) and operation not in RANGED:
            return False
        if self.ranges and not any((end is None or offset < end) and offset + count > start
                                   for start, end in self.ranges):
            return False
        return all(_SIZE_TESTS[op](count, n) for op, n in self.size_checks)


_SIZE_TESTS: dict[str, Callable[[int, int], bool]] = {
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b}


def _client_in(client: Any, spec: Network | str) -> bool:
    if isinstance(spec, str):  # "unix"
        return client == UNIX_CLIENT
    return isinstance(client, (ipaddress.IPv4Address, ipaddress.IPv6Address)) and client in spec


@dataclass
class Policy:
    rules: list[Rule] = field(default_factory=list)
    readonly: list[Rule] = field(default_factory=list)
    default: str = "allow"


def parse_policy(text: str, source: str = "policy") -> Policy:
    """Parse a policy file; ConfigError names the line of the first mistake."""
    policy = Policy()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            words = line.split()
            if words[0] == "readonly":
                policy.readonly.append(_parse_conditions(number, line, "readonly", frozenset(), words[1:]))
                continue
            if words[0] == "default":
                if len(words) != 2 or words[1] not in ("allow", "deny"):
                    raise ValueError("expected 'default allow' or 'default deny'")
                policy.default = words[1]
                continue
            policy.rules.append(_parse_rule(number, line, words))
        except ValueError as e:
            raise ConfigError(f"{source}:{number}: {e}: {line!r}") from None
    return policy


def _parse_rule(number: int, line: str, words: list[str]) -> Rule:
    action = words[0]
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r} (allow, deny, readonly, default)")
    if len(words) < 2:
        raise ValueError("missing operations")
    operations: set[str] = set()
    for name in words[1].split(","):
        if name in ALIASES:
            operations.update(ALIASES[name])
        elif name in OPERATIONS:
            operations.add(name)
        else:
            raise ValueError(f"unknown operation {name!r} ({', '.join(OPERATIONS)}, writes, *)")
    return _parse_conditions(number, line, action, frozenset(operations), words[2:])


def _parse_conditions(number: int, line: str, action: str, operations: frozenset[str],
                      conditions: list[str]) -> Rule:
    ranges: list[tuple[int, int | None]] = []
    sizes: list[tuple[str, int]] = []
    exports: list[str] = []
    clients: list[Network | str] = []
    for condition in conditions:
        if condition.startswith("size"):
            op = next((o for o in (">=", "<=", ">", "<") if condition[4:].startswith(o)), None)
            if op is None:
                raise ValueError(f"bad size condition {condition!r} (size>N, size>=N, size<N, size<=N)")
            sizes.append((op, parse_size(condition[4 + len(op):])))
            continue
        key, sep, value = condition.partition("=")
        if not sep or not value:
            raise ValueError(f"bad condition {condition!r} (range=, size, export=, client=)")
        items = value.split(",")
        if key == "range":
            for item in items:
                start_text, dash, end_text = item.partition("-")
                if not dash:
                    raise ValueError(f"bad range {item!r} (START-END, END exclusive, or START-)")
                start = parse_size(start_text)
                end = parse_size(end_text) if end_text else None
                if end is not None and end <= start:
                    raise ValueError(f"empty range {item!r}")
                ranges.append((start, end))
        elif key == "export":
            exports.extend(items)
        elif key == "client":
            for item in items:
                clients.append(UNIX_CLIENT if item == UNIX_CLIENT else ipaddress.ip_network(item, strict=False))
        else:
            raise ValueError(f"unknown condition {key!r} (range=, size, export=, client=)")
    if action == "readonly" and (ranges or sizes):
        raise ValueError("readonly takes only export= and client= conditions")
    if (ranges or sizes) and not operations & RANGED:
        raise ValueError("range= and size conditions apply only to read, write, zero, trim, cache, extents")
    if exports and operations == {"connect"}:
        raise ValueError("connect is judged before the client names an export: use open with export=")
    return Rule(number, line, action, operations, tuple(ranges), tuple(sizes), tuple(exports), tuple(clients))


def client_address(sock: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str | None:
    """The client's IP address, "unix" for a Unix-domain socket, None if unknown."""
    if sock is None:
        return None
    try:
        if sock.family == socket.AF_UNIX:
            return UNIX_CLIENT
        address = ipaddress.ip_address(sock.getpeername()[0])
    except (OSError, ValueError):
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _describe(client: Any) -> str:
    return "unknown client" if client is None else f"client {client}"


class PolicyFilter(Filter):
    """Allow or deny requests by operation, range, size, export name and client address."""

    name = "policy"
    resize_passthrough = True  # the size is the plugin's; resize is judged like any request
    policy = Param(Path("file"), required=True, help="the rules file (see docs/filters/policy.md)")

    def config_complete(self) -> None:
        try:
            with open(self.policy, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"policy: cannot read {self.policy}: {e}") from None
        self.rules = parse_policy(text, self.policy)

    def decide(self, operation: str, client: Any, export: str | None, offset: int = 0,
               count: int = 0) -> Rule | None:
        """The first matching rule (None: no rule matched, the default applies)."""
        for rule in self.rules.rules:
            if rule.matches_connection(client, export) and rule.matches_request(operation, offset, count):
                return rule
        return None

    def preconnect(self, client: Any, readonly: bool) -> None:
        address = client_address(client)
        rule = self.decide("connect", address, None)
        if rule is not None and rule.action == "deny":
            log.warning("policy: refused a connection from %s (%s)", _describe(address), _cite(rule))
            raise NBDError(errno.EPERM, "connection refused by policy")

    def open(self, next_open, readonly: bool, export_name: str) -> FilterHandle:
        address = client_address(current_client())
        rule = self.decide("open", address, export_name)
        if rule is not None and rule.action == "deny":
            log.warning("policy: refused export %r to %s (%s)", export_name, _describe(address), _cite(rule))
            raise NBDError(errno.EPERM, "export refused by policy")
        if not readonly and any(r.matches_connection(address, export_name) for r in self.rules.readonly):
            readonly = True
        return super().open(next_open, readonly, export_name)

    class Handle(FilterHandle):
        filter: "PolicyFilter"

        def __init__(self, filter: "PolicyFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            self.export_name = export_name
            self.client = client_address(current_client())
            # Client and export are fixed for the connection: keep only the rules that can match.
            self.rules = [r for r in filter.rules.rules if r.matches_connection(self.client, export_name)]
            self.default_allows = filter.rules.default == "allow"
            self.tokens = float(LOG_BURST)
            self.refill = time.monotonic()
            self.suppressed = 0

        def check(self, operation: str, offset: int = 0, count: int = 0) -> None:
            for rule in self.rules:
                if rule.matches_request(operation, offset, count):
                    if rule.action == "allow":
                        return
                    self.refuse(operation, offset, count, rule)
            if not self.default_allows:
                self.refuse(operation, offset, count, None)

        def refuse(self, operation: str, offset: int, count: int, rule: Rule | None) -> None:
            now = time.monotonic()
            self.tokens = min(LOG_BURST, self.tokens + now - self.refill)
            self.refill = now
            where = f" [{offset}, +{count})" if operation in RANGED else ""
            if self.tokens >= 1:
                self.tokens -= 1
                more = f"; {self.suppressed} more refusals not logged" if self.suppressed else ""
                self.suppressed = 0
                log.warning("policy: denied %s%s on export %r to %s (%s)%s", operation, where,
                            self.export_name, _describe(self.client), _cite(rule), more)
            else:
                self.suppressed += 1
            raise NBDError(errno.EPERM, f"{operation} denied by policy")

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            self.check("read", offset, len(buf))
            self.next.pread(buf, offset, flags)

        def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> Holes:
            self.check("read", offset, len(buf))
            return self.next.pread_sparse(buf, offset, flags)

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            self.check("write", offset, len(buf))
            self.next.pwrite(buf, offset, flags)

        def zero(self, count: int, offset: int, flags: int) -> None:
            self.check("zero", offset, count)
            self.next.zero(count, offset, flags)

        def trim(self, count: int, offset: int, flags: int) -> None:
            self.check("trim", offset, count)
            self.next.trim(count, offset, flags)

        def flush(self, flags: int) -> None:
            self.check("flush")
            self.next.flush(flags)

        def cache(self, count: int, offset: int, flags: int) -> None:
            self.check("cache", offset, count)
            self.next.cache(count, offset, flags)

        def extents(self, count: int, offset: int, flags: int, extents) -> None:
            self.check("extents", offset, count)
            self.next.extents(count, offset, flags, extents)

        def resize(self, size: int) -> None:
            self.check("resize")
            self.next.resize(size)


def _cite(rule: Rule | None) -> str:
    return f"line {rule.line}: {rule.text}" if rule is not None else "default deny"


FILTER = PolicyFilter
