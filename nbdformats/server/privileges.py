"""-u USER / -g GROUP: the server binds its sockets as root, then gives root up before serving.

Resolved at start-up (an unknown user or group stops the server before it listens); dropped after
binding with initgroups (or setgroups to the one group), setgid and setuid, and checked: when the
kernel refuses, or root could be regained, the server does not start.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

from ..api.errors import ConfigError


@dataclass(frozen=True)
class Identity:
    """Who the server becomes: a user (with the name initgroups needs, if it has one) and a group."""

    uid: int | None
    gid: int | None
    user_name: str | None = None


def _user(text: str) -> pwd.struct_passwd | int:
    try:
        return pwd.getpwnam(text)
    except KeyError:
        pass
    if text.isdigit():
        try:
            return pwd.getpwuid(int(text))
        except KeyError:
            return int(text)
    raise ConfigError(f"-u {text}: not a user name or uid")


def _group(text: str) -> int:
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        pass
    if text.isdigit():
        return int(text)
    raise ConfigError(f"-g {text}: not a group name or gid")


def resolve_identity(user: str | None, group: str | None) -> Identity | None:
    """The identity -u/-g ask for (None when neither is given).  -u alone takes the user's own
    group, as login does: a server that kept root's group would still own root's files."""
    if user is None and group is None:
        return None
    gid = _group(group) if group is not None else None
    if user is None:
        return Identity(uid=None, gid=gid)
    entry = _user(user)
    if isinstance(entry, int):
        if gid is None:
            raise ConfigError(f"-u {user}: uid {entry} has no passwd entry, so no group: give -g GROUP too")
        return Identity(uid=entry, gid=gid)
    return Identity(uid=entry.pw_uid, gid=entry.pw_gid if gid is None else gid, user_name=entry.pw_name)


def drop_privileges(identity: Identity) -> None:
    """Become `identity` for good: supplementary groups, then group, then user."""
    try:
        if identity.gid is not None:
            if identity.user_name is not None:  # the user's own supplementary groups, and gid
                os.initgroups(identity.user_name, identity.gid)
            else:
                os.setgroups([identity.gid])
            os.setgid(identity.gid)
        if identity.uid is not None:
            os.setuid(identity.uid)
    except OSError as e:
        raise ConfigError(f"cannot change to uid {identity.uid} gid {identity.gid} (-u/-g): {e.strerror}; "
                          "the server must start as root to do so") from None
    if identity.uid not in (None, 0):
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise ConfigError("-u: root privileges could be regained after setuid; refusing to serve")
