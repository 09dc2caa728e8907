"""Shared fixtures for the repository's test dirs: the same ones the installed conformance suite uses.

They live in :mod:`kvmgmem.conformance.fixtures` (backend parametrization honouring ``KVMGMEM_BACKENDS``,
``system``/``vm``/``vm_of``/``protected_vm``, and the autouse fd/mapping leak check); this conftest only
re-exports them so pytest registers them for ``tests/``.
"""

from __future__ import annotations

from kvmgmem.conformance.fixtures import *  # noqa: F403
from kvmgmem.conformance.fixtures import BACKEND_NAMES, open_backend, vm_type_name  # noqa: F401 (tests import these)
