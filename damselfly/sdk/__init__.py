"""Front doors for programs: the Python client and the fsspec ``p2p::`` filesystem."""
