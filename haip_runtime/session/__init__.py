"""One client's protocol state: its session (outbound window, flow, negotiation, liveness,
limits), the registry of sessions, and the connection that serves it over a transport."""
