"""Transactions (conversations): members, agents, runs, the event log and the agents' history,
and the registry that keeps them in memory or brings them back from the store."""
