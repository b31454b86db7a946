"""Front doors for programs: the Python client, the fsspec ``p2p::`` filesystem, and preheat through a scheduler."""
