"""Bytes on disk: sparse task files, piece metadata in SQLite, digests, GC."""
