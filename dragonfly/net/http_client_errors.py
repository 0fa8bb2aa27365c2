"""The errors of the HTTP client: each message names the URL and what went wrong
(connect, timeout, protocol, a body cut short)."""

from __future__ import annotations


class HTTPClientError(Exception):
    """A request that could not be completed."""


class ConnectError(HTTPClientError):
    pass


class HTTPTimeout(HTTPClientError):
    pass


class BadResponse(HTTPClientError):
    pass


class BodyIncomplete(HTTPClientError):
    pass


class TooManyRedirects(HTTPClientError):
    pass
