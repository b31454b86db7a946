"""Metrics and logs, shared by every service."""
