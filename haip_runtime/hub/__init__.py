"""The router: each inbound envelope of a session to the transaction, run or tool call it concerns."""
