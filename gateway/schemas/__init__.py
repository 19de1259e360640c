"""Message schema catalogue: JSON Schema Draft 2020-12 per message type and version."""

from gateway.schemas.failures import json_pointer
from gateway.schemas.registry import CatalogueError, SchemaRegistry

__all__ = ["CatalogueError", "SchemaRegistry", "json_pointer"]
