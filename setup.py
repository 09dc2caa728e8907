"""Build configuration that pyproject.toml cannot express: the C extensions (the kvm backend's exit loop, the
sim's TLB-fill walk).

``kvmgmem.backends.kvm._run`` does KVM_RUN with the GIL released and decodes KVM_EXIT_IO in C (see its source).
It is built by every ``pip install`` (editable or not). It is optional so that an install on a machine without
a C compiler still works, on the pure-Python path; ``tests/kvm/test_run_paths.py`` fails when the extension
is missing and ``KVMGMEM_NO_CEXT`` is not set, so a silently failed build does not go unnoticed.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kvmgmem.backends.kvm._run",
            sources=["src/kvmgmem/backends/kvm/_run.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            optional=True,
        ),
        # the sim's TLB-fill fast walk (pure-Python fallback in backends/sim/cpu_walk.py)
        Extension(
            "kvmgmem.backends.sim._walk",
            sources=["src/kvmgmem/backends/sim/_walk.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            optional=True,
        ),
    ]
)
