"""Tests of the plugin registry and the built-in agents."""
