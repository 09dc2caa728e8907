"""The sim's ``private_access_bit`` option (the profile option behind the private access bit): off by default,
validated, and not a kernel capability."""

from __future__ import annotations

import pytest

import kvmgmem
from kvmgmem.backends.sim import PROFILES


def test_profile_option_default_off_and_validated() -> None:
    with kvmgmem.open("sim") as system:
        assert system.profile == PROFILES["6.18"]  # type: ignore[attr-defined]
        assert system.profile.private_access_bit is None  # type: ignore[attr-defined]
        assert system.private_access_bit is None
    with kvmgmem.open("sim", private_access_bit=51) as system:
        assert system.private_access_bit == 51
        assert system.profile.name == "6.18"  # type: ignore[attr-defined]
    for bad in (True, 11, 52, 63, "51", 51.0):
        with pytest.raises(ValueError, match="private_access_bit"):
            kvmgmem.open("sim", private_access_bit=bad)


def test_option_is_not_a_kernel_cap() -> None:
    """Capabilities stay exactly the default profile's."""
    from kvmgmem import uapi

    caps = [getattr(uapi, n) for n in dir(uapi) if n.startswith("KVM_CAP_")]
    with kvmgmem.open("sim") as plain, kvmgmem.open("sim", private_access_bit=51) as cbit:
        assert [plain.check_extension(c) for c in caps] == [cbit.check_extension(c) for c in caps]
