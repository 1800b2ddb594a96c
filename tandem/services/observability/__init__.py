"""Traces, metrics, logs and health endpoints of every stage."""
