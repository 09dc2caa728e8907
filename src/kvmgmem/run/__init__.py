"""``kvmgmem run``: unmodified C programs on the sim, through a preloaded library.

The launcher (:mod:`kvmgmem.run.launcher`) starts the program with ``LD_PRELOAD`` set to the library built from
``_preload.c``; the library embeds this interpreter's Python inside the program and routes the program's calls
on ``/dev/kvm`` and on the fds the sim owns to ``kvmgmem.run.server``.
"""
