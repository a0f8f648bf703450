"""Test helpers shared by every suite: live servers, raw and transport peers, example agents, MCP and vendor fakes."""
