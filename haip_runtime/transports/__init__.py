"""Transports turn sockets into streams of decoded envelopes and back; nothing else."""
