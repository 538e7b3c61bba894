"""Fault injection for the reliability tests: plugin methods (``faults``), row writers killed
mid-write (``writer``), and a helper to run the real CLI with tiny grid points (``cli``).

Job processes import these as ``faultlib.*``: the tests put ``tests/`` on PYTHONPATH.
"""
