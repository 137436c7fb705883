"""ip filter: allow or deny clients by address, before the handshake (nbdkit-ip-filter compatible).

A client matching any allow rule is accepted; otherwise one matching any deny rule is refused;
anyone else is accepted.  Rules: all/any, allipv4/anyipv4, allipv6/anyipv6, allunix/anyunix,
allvsock/anyvsock, an IPv4 or IPv6 address or network (CIDR), and for Unix sockets pid:PID,
uid:UID, gid:GID (the peer's credentials), for vsock vsock-cid:CID and vsock-port:PORT.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

from ..api.chain import Filter
from ..api.errors import NBDError
from ..api.params import Param, ParamType

AF_VSOCK = getattr(socket, "AF_VSOCK", 40)
PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_KEYWORDS = {"all": "any", "any": "any", "allipv4": "ipv4", "anyipv4": "ipv4", "allipv6": "ipv6",
             "anyipv6": "ipv6", "allunix": "unix", "anyunix": "unix", "allvsock": "vsock", "anyvsock": "vsock"}
_NUMBERED = ("pid", "uid", "gid", "vsock-cid", "vsock-port")

@dataclass(frozen=True)
class Rule:
    kind: str  # any, ipv4, ipv6, unix, vsock, net, or one of _NUMBERED
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    number: int = 0
    text: str = ""

@dataclass(frozen=True)
class Peer:
    """What the rules look at: the socket family and, depending on it, address or credentials."""

    family: int
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    cid: int | None = None
    port: int | None = None

    def describe(self) -> str:
        if self.address is not None:
            return str(self.address)
        if self.family == socket.AF_UNIX:
            return f"unix socket (pid {self.pid}, uid {self.uid}, gid {self.gid})"
        if self.family == AF_VSOCK:
            return f"vsock (cid {self.cid}, port {self.port})"
        return f"socket family {self.family}"

def parse_rule(text: str) -> Rule:
    word = text.strip()
    if word in _KEYWORDS:
        return Rule(_KEYWORDS[word], text=word)
    prefix, colon, number = word.partition(":")
    if colon and prefix in _NUMBERED:
        if not number.isdigit():
            raise ValueError(f"{word!r}: {prefix}: needs a number")
        return Rule(prefix, number=int(number), text=word)
    try:
        return Rule("net", network=ipaddress.ip_network(word, strict=False), text=word)
    except ValueError:
        raise ValueError(f"{word!r} is not an address, a network (A.B.C.D/NN, A:B::/NN), a keyword "
                         f"(all, anyipv4, anyipv6, anyunix, anyvsock) or pid:/uid:/gid:/vsock-cid:/vsock-port:N") \
            from None

class RuleList(ParamType):
    metavar = "ADDR[,ADDR...]"

    def parse(self, text: str) -> list[Rule]:
        return [parse_rule(item) for item in text.split(",") if item.strip()]

def matches(rule: Rule, peer: Peer) -> bool:
    kind = rule.kind
    if kind == "any":
        return True
    if kind == "ipv4":
        return peer.family == socket.AF_INET
    if kind == "ipv6":
        return peer.family == socket.AF_INET6
    if kind == "unix":
        return peer.family == socket.AF_UNIX
    if kind == "vsock":
        return peer.family == AF_VSOCK
    if kind == "net":
        network = rule.network
        assert network is not None  # "net" rules always have one
        return peer.address is not None and peer.address.version == network.version \
            and peer.address in network  # type: ignore[operator]
    value = {"pid": peer.pid, "uid": peer.uid, "gid": peer.gid, "vsock-cid": peer.cid,
             "vsock-port": peer.port}[kind]
    return value is not None and value == rule.number

def permitted(peer: Peer, allow: list[Rule], deny: list[Rule]) -> bool:
    """The allow list first, then the deny list; no match means permitted."""
    if any(matches(rule, peer) for rule in allow):
        return True
    return not any(matches(rule, peer) for rule in deny)

def peer_of(client: Any) -> Peer:
    """The family and address (or credentials) of a connected client socket."""
    family = client.family
    if family in (socket.AF_INET, socket.AF_INET6):
        host = client.getpeername()[0]
        return Peer(family, address=ipaddress.ip_address(host.split("%", 1)[0]))
    if family == socket.AF_UNIX:
        # Through a duplicate so any socket-like object works.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=os.dup(client.fileno())) as sock:
            pid, uid, gid = PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
        return Peer(family, pid=pid, uid=uid, gid=gid)
    if family == AF_VSOCK:
        cid, port = client.getpeername()
        return Peer(family, cid=cid, port=port)
    return Peer(family)

class IpFilter(Filter):
    """Allow or deny clients by IP address, network, Unix socket credentials or vsock address."""

    name = "ip"
    resize_passthrough = True
    allow = Param(RuleList(), repeat=True, help="Clients to accept (comma-separated rules)")
    deny = Param(RuleList(), repeat=True, help="Clients to refuse unless allowed (comma-separated rules)")

    def config_complete(self) -> None:
        self.allow_rules = [rule for rules in self.allow for rule in rules]
        self.deny_rules = [rule for rules in self.deny for rule in rules]

    def preconnect(self, client: Any, readonly: bool) -> None:
        if not (self.allow_rules or self.deny_rules) or client is None:
            return
        try:
            peer = peer_of(client)
        except OSError as e:
            raise NBDError(errno.EPERM, f"ip: cannot identify the client: {e.strerror}") from None
        if not permitted(peer, self.allow_rules, self.deny_rules):
            raise NBDError(errno.EPERM, f"ip: client {peer.describe()} is not permitted to connect")

FILTER = IpFilter
