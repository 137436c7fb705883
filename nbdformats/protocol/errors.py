"""The error of the protocol layer, shared by server and client."""


class ProtocolError(Exception):
    """The peer broke the protocol so badly that the connection must be dropped."""
