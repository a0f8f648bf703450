"""Tests of the ASGI app's own routes and the browser playground."""
