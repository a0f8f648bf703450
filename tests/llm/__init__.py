"""Tests of the LLM providers, each against a local server speaking its vendor's format."""
