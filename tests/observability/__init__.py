"""Tests of logging (redaction, budgets) and metrics."""
