"""Tests of the plugin authors' harness."""
