"""Tests of transactions: members, runs and their limit, the log and the agents' history."""
