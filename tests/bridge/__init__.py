"""Tests of the MCP bridge against real MCP servers (stdio, HTTP, in-process)."""
