"""Behaviour suites over a live server: each protocol promise, over every transport where it applies."""
