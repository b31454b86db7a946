"""A whole cluster on one machine: the demo, the local cluster runner and a test origin."""
