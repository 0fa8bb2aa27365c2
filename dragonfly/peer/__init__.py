"""The peer's download engine: piece picking, parents, back-to-source."""
