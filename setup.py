"""Build configuration that pyproject.toml cannot express: the C extensions (the kvm backend's exit loop, the
sim's TLB-fill walk) and the library ``kvmgmem run`` preloads into C programs (``kvmgmem/run/_preload*.so``;
the tests under ``tests/run`` fail when it was not built).

``kvmgmem.backends.kvm._run`` does KVM_RUN with the GIL released and decodes KVM_EXIT_IO in C (see its source).
It is built by every ``pip install`` (editable or not). It is optional so that an install on a machine without
a C compiler still works, on the pure-Python path; ``tests/kvm/test_run_paths.py`` fails when the extension
is missing and ``KVMGMEM_NO_CEXT`` is not set, so a silently failed build does not go unnoticed.
"""

import sysconfig

from setuptools import Extension, setup


def _libpython_link_args() -> list[str]:
    """Link the preload library against this interpreter's libpython, found again at run time by rpath: the
    program it is preloaded into does not link Python. Without a shared libpython (a static build) the link
    fails and, the extension being optional, the install goes on without ``kvmgmem run``."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ldlibrary = sysconfig.get_config_var("LDLIBRARY") or ""  # e.g. libpython3.11.so
    name = ldlibrary.removeprefix("lib").split(".so")[0]
    return [f"-L{libdir}", f"-l{name}", f"-Wl,-rpath,{libdir}", "-ldl", "-lpthread"]


setup(
    ext_modules=[
        Extension(
            "kvmgmem.backends.kvm._run",
            sources=["src/kvmgmem/backends/kvm/_run.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            optional=True,
        ),
        # the sim's TLB-fill fast walk (pure-Python fallback in backends/sim/cpu/fastwalk.py)
        Extension(
            "kvmgmem.backends.sim._walk",
            sources=["src/kvmgmem/backends/sim/_walk.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            optional=True,
        ),
        # `kvmgmem run`: the library preloaded into a C program, embedding Python (not a Python module: no
        # PyInit; the launcher finds the file next to kvmgmem/run/__init__.py)
        Extension(
            "kvmgmem.run._preload",
            sources=["src/kvmgmem/run/_preload.c", "src/kvmgmem/run/_preload_py.c"],
            depends=["src/kvmgmem/run/_preload.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers", "-fvisibility=hidden"],
            extra_link_args=_libpython_link_args(),
            optional=True,
        ),
    ]
)
