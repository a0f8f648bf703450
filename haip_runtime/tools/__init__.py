"""The tool proxy: the one way an agent or a user calls a tool (permissions, approval, progress, cancel)."""
