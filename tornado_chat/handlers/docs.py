"""``GET /api/openapi.json``: the OpenAPI document of the HTTP API, as kept in the package."""

from __future__ import annotations

import functools
from pathlib import Path

from tornado_chat.handlers.base import BaseHandler

OPENAPI_PATH = Path(__file__).parent.parent / "api" / "openapi.json"


@functools.cache
def openapi_document() -> bytes:
    """The document's bytes, read once per process (it ships with the package)."""
    return OPENAPI_PATH.read_bytes()


class OpenApiHandler(BaseHandler):
    """Serves the OpenAPI document byte for byte, so clients see the file under test."""

    def get(self) -> None:
        """200 with the document."""
        self.finish(openapi_document())
