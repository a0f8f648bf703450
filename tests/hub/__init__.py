"""Tests of the hub's routing and handlers."""
