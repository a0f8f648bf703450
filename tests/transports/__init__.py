"""Tests of the transports on their own."""
