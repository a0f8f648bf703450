"""The server: the ASGI app and its ``Runtime``, the HTTP routes (HAIP doors, REST history, health, metrics, playground)."""
