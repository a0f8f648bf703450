"""Tests of tokens, keys and permissions."""
