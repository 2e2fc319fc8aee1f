"""The one error type the router's request path raises: a gRPC status and a message."""

from __future__ import annotations

import grpc


class RequestError(Exception):
    """Ends a request with ``code``; ``trailers`` go to the client as trailing metadata
    (for example ``retry-after-ms`` on RESOURCE_EXHAUSTED)."""

    def __init__(self, code: grpc.StatusCode, message: str, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.trailers = trailers
