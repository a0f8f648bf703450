"""Tests of the protocol layer: envelopes, payloads, the codec, and the guide held against the code."""
