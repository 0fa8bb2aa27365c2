"""Dragonfly: peer-to-peer file distribution and image acceleration on trio."""

__version__ = "0.1.0"
