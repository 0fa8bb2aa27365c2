"""Formats that do no I/O: the CBOR message schema and codec, HTTP header and range
parsing, OCI registry routes. The trio code that carries them is in dragonfly/net/."""

# The message classes register themselves with the codec when their module loads:
# loading them with the package means ``codec.decode`` knows every type whichever
# module of the package a caller imports first.
from dragonfly.wire import messages as _messages  # noqa: F401
