"""Message schema catalogue: JSON Schema Draft 2020-12 per message type and version."""

from gateway.schemas.registry import CatalogueError, SchemaRegistry, json_pointer

__all__ = ["CatalogueError", "SchemaRegistry", "json_pointer"]
