"""Settings every test of the suite shares."""

import os

# The suite's origins (HTTP servers, registries, object stores) run on 127.0.0.1, which the
# back-to-source policy refuses by default: the suite allows loopback origins here. Tests of
# the default settings build them with ``allow_loopback=False`` explicitly.
os.environ["DAMSELFLY_SECURITY__SOURCES__ALLOW_LOOPBACK"] = "true"
