"""Tests of the stores, memory and SQLite, against one contract."""
