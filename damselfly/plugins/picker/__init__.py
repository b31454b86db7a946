"""Built-in piece pickers: the order in which a daemon fetches the pieces it misses."""
