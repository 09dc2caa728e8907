"""Guest tests use ``make_guest`` from :mod:`kvmgmem.conformance.fixtures` (re-exported by tests/conftest.py):
one run per backend, a missing VM type is a skip that names it, everything else fails loudly."""
