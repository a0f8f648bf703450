"""What the default haip.toml runs, carried in the package so ``serve`` works in any folder.

``haip.toml`` here is the embedded default configuration (the repository's own haip.toml is the
same file); ``storyteller`` is an example agent, ``mcp_server`` the demo MCP server (run with
``python -m haip_runtime.demo.mcp_server``) and ``team_tools`` an in-process tool module.
"""
