"""OCI distribution: the registry client that sources, the proxy and preheat share."""
