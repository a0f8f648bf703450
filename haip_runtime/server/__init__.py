"""The server: the ASGI app and its ``Runtime``, and the HTTP routes (the HAIP doors, REST
history, health, metrics, the playground)."""
