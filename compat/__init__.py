"""Compatibility layers: other ecosystems' clients, pointed at a dlhub manager."""
