"""Trust: who may ask for what (admission), which origins may be reached (policy),
who a peer is (identity, from its mTLS certificate), TLS contexts and certificates.

docs/security.md is the written trust model; this package is where it is enforced.
"""
