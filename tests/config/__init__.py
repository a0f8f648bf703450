"""Tests of configuration loading, validation and its schema."""
