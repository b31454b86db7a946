"""Hypothesis for the property tests: no example database in the tree, no deadlines (CI
machines are slow and shared); each test sets its own ``max_examples`` so the folder runs
in well under a minute. A failure prints the seed to reproduce it with."""

from hypothesis import settings

settings.register_profile("damselfly", database=None, deadline=None, print_blob=True)
settings.load_profile("damselfly")
