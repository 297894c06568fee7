"""Tests that need more than one NUMA node: run them with python -m tests.numa_guest."""
