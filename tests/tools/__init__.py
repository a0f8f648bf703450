"""Tests of the tool proxy: permissions, approvals, progress, cancellation."""
