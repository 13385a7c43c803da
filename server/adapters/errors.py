"""Typed errors of adapter sources; `error_type` is stable, for clients and the operator."""

from __future__ import annotations


class SourceError(Exception):
    """A source could not be parsed, fetched or unpacked safely."""

    def __init__(self, message: str, error_type: str = "adapter_download") -> None:
        super().__init__(message)
        self.error_type = error_type
