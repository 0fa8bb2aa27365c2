"""Formats that do no I/O: the CBOR message schema and codec, HTTP header and range
parsing, OCI registry routes. The trio code that carries them is in dragonfly/net/.

The message classes register themselves with the codec when dragonfly.wire.messages
loads: whoever decodes frames imports it (dragonfly/net/channel.py does). It is not
loaded with the package, so a client that only parses HTTP (`dragonfly get`) does not
pay for building every message's validator."""
