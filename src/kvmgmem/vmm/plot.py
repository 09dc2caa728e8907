"""The guest-physical map over time as a PNG: which RAM is private, shared, or backed by nothing.

Rows are chunks of the RAM region (gpa grows upwards), columns are samples in time. A chunk is *private*
while the last conversion covering it made it private (replayed from the trace's convert events), otherwise
*shared* when its shared store holds pages (measured with mincore by the sampler) and *unbacked* when it
holds none — the state a discard policy produces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .convert import Region
from .trace import Tracer

UNBACKED, SHARED, PRIVATE = 0, 1, 2


def private_state(tracer: Tracer, region: Region, chunks: int, times: Sequence[float]) -> list[list[bool]]:
    """For each sample time, which chunks are private (a chunk counts as private once any page is)."""
    size = region.size // chunks
    converts = sorted((e for e in tracer.events if e.kind == "convert"), key=lambda e: e.ts + e.duration)
    state = [False] * chunks
    out, i = [], 0
    for t in times:
        while i < len(converts) and converts[i].ts + converts[i].duration <= t:
            args = converts[i].args
            lo = max(args["gpa"], region.gpa) - region.gpa
            hi = min(args["gpa"] + args["size"], region.end) - region.gpa
            for c in range(max(lo, 0) // size, min((hi + size - 1) // size, chunks)):
                state[c] = bool(args["private"])
            i += 1
        out.append(list(state))
    return out


def plot_map(path: str, tracer: Tracer, samples: Sequence[tuple[float, list[int], list[bool]]], region: Region,
             *, chunks: int, report: Any = None) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    if not samples:
        samples = [(tracer.now(), [], [False] * chunks)]
    times = [s[0] for s in samples]
    private = private_state(tracer, region, chunks, times)
    grid = [
        [PRIVATE if private[t][c] else (SHARED if samples[t][2][c] else UNBACKED) for t in range(len(times))]
        for c in range(chunks)
    ]
    colors = ["#d9d9d9", "#4c9be8", "#d1495b"]
    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    mib = region.size / (1 << 20)
    ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", cmap=ListedColormap(colors),
              vmin=0, vmax=2, extent=(times[0], times[-1] if len(times) > 1 else times[0] + 0.1, 0, mib))  # fmt: skip
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"offset in RAM at gpa {region.gpa:#x} (MiB)")
    title = "guest-physical map over time"
    if report is not None:
        title += f" — {report.backend}, {report.vcpus} vCPUs, policy {report.policy}"
    ax.set_title(title)
    ax.legend(handles=[Patch(color=colors[PRIVATE], label="private"), Patch(color=colors[SHARED], label="shared"),
                       Patch(color=colors[UNBACKED], label="unbacked")],
              loc="upper right", framealpha=0.9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
