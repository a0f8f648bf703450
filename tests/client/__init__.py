"""Tests of the Python client and the terminal chat."""
