"""The peer daemon."""
