"""Helpers of tests/test_fuzz.py: hypothesis strategies for every method of the
contract (strategies.py), the checks run after every call (harness.py) and a
client that calls as an unprivileged user (unpriv_proxy.py)."""
