"""What operators read: log set-up with secret redaction, and the Prometheus metrics."""
