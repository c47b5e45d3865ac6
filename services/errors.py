"""HTTP errors of the server: each carries its status and, where one input is at fault, the
field. The app's one handler turns them (and canopy's and data_catalog's user errors) into a
JSON body ``{"error": "...", "field": ...}``; nothing else reaches a client, stack traces never."""

from __future__ import annotations


class ServiceError(Exception):
    status = 400

    def __init__(self, message: str, *, field: str | None = None, status: int | None = None):
        super().__init__(message)
        self.field = field
        if status is not None:
            self.status = status


class BadRequest(ServiceError):
    """An input that cannot be served as given (422: the request was well-formed HTTP)."""

    status = 422


class NotFound(ServiceError):
    status = 404


class TooLarge(ServiceError):
    status = 413


class TooMany(ServiceError):
    status = 429


class Forbidden(ServiceError):
    status = 403
