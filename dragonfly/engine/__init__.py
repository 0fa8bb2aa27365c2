"""The peer's decisions, sans-I/O: the download machine, the piece picker and the
announcement schedule. No sockets, no trio, no clock: the trio driver
(dragonfly/peer/download.py) and the simulation (dragonfly/sim/) feed them events."""
