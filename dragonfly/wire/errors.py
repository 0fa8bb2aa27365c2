"""The error every wire decoding failure raises: one ``ProtocolError`` naming what was wrong."""

__all__ = ["ProtocolError"]


class ProtocolError(Exception):
    """A frame that breaks the protocol; the message names what was wrong.

    ``fatal`` is True only for an oversize frame (the caller closes the
    connection); otherwise the caller answers with an Error message and goes on.
    ``ref`` is the offending message's type tag when it was known.
    """

    def __init__(self, message: str, *, fatal: bool = False, ref: str | None = None) -> None:
        super().__init__(message)
        self.fatal = fatal
        self.ref = ref
