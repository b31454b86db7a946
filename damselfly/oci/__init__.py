"""OCI distribution: the registry client that sources, the proxy and preheat share, and the
container runtimes' mirror configuration that points them at a daemon's proxy."""
