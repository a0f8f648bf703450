"""Tests of one client's protocol state: the session, its window, flow, negotiation, liveness,
limits, and the connection's handshake."""
