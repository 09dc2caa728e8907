"""The guest-physical map over time as a PNG: which RAM is private, shared, or backed by nothing.

Columns are samples in time; the RAM region is drawn as one *band* per vCPU range it is split into (each
vCPU's explicit range, converted by hypercalls, and its implicit range, converted by memory faults), each
band in rows. A row is *private* while the last conversion covering it made it private (replayed from the
trace's convert events), otherwise *shared* when its shared store holds pages (measured with mincore by the
sampler) and *unbacked* when it holds none — the state a discard policy produces.

Bands get a share of the height by what there is to see, not by bytes: a 256 KiB implicit range next to a
32 MiB explicit one would be a fraction of a pixel tall, so it gets a fixed share and the y ticks give the
real offsets. A strip above the map marks every guest_memfd punch and shared-memory discard in time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from .convert import Region
from .trace import Tracer

UNBACKED, SHARED, PRIVATE = 0, 1, 2
COLORS = ["#d9d9d9", "#4c9be8", "#d1495b"]


@dataclass(frozen=True)
class Band:
    """A range of the region drawn as ``rows`` rows over ``weight`` units of the map's height."""

    label: str
    offset: int
    size: int
    rows: int
    weight: float

    def row_ranges(self) -> list[tuple[int, int]]:
        """(offset, size) of each row, page-aligned, covering the band."""
        edges = [self.offset + (self.size * i // self.rows) // 4096 * 4096 for i in range(self.rows)]
        edges.append(self.offset + self.size)
        return [(lo, hi - lo) for lo, hi in pairwise(edges) if hi > lo]


def demo_bands(vcpus: int, chunk: int, implicit: int, memory: int) -> list[Band]:
    """The demo's layout: per vCPU its explicit range, then its implicit range (if any)."""
    bands = []
    for i in range(vcpus):
        base = i * chunk
        explicit = chunk - implicit
        rows = max(1, min(64 // vcpus if vcpus <= 8 else 4, explicit // 4096))
        bands.append(Band(f"vCPU {i}: explicit\n(hypercalls)", base, explicit, rows, 3.0 if implicit else 4.0))
        if implicit:
            rows = min(4, implicit // 4096)
            bands.append(Band(f"vCPU {i}: implicit\n(memory faults)", base + explicit, implicit, rows, 1.0))
    tail = memory - vcpus * chunk
    if tail:
        bands.append(Band("unused", vcpus * chunk, tail, 1, 0.5))
    return bands


def private_state(tracer: Tracer, region: Region, rows: Sequence[tuple[int, int]],
                  times: Sequence[float]) -> list[list[bool]]:  # fmt: skip
    """For each sample time, which rows are private (a row counts as private once any page of it is)."""
    converts = sorted((e for e in tracer.events if e.kind == "convert"), key=lambda e: e.ts + e.duration)
    state = [False] * len(rows)
    out, i = [], 0
    for t in times:
        while i < len(converts) and converts[i].ts + converts[i].duration <= t:
            args = converts[i].args
            lo, hi = args["gpa"] - region.gpa, args["gpa"] + args["size"] - region.gpa
            for r, (offset, size) in enumerate(rows):
                if offset < hi and lo < offset + size:
                    state[r] = bool(args["private"])
            i += 1
        out.append(list(state))
    return out


def _offset_label(offset: int) -> str:
    if offset % (1 << 20) == 0:
        return f"{offset >> 20} MiB"
    return f"{offset / (1 << 20):.2f} MiB"


def plot_map(path: str, tracer: Tracer, samples: Sequence[tuple[float, list[int], list[bool]]], region: Region,
             *, bands: Sequence[Band], report: Any = None) -> None:  # fmt: skip
    """Write the PNG. ``samples`` are (time, rounds, resident per row of ``bands``) from the demo's sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    rows = [r for band in bands for r in band.row_ranges()]
    if not samples:
        samples = [(tracer.now(), [], [False] * len(rows))]
    times = [s[0] for s in samples]
    private = private_state(tracer, region, rows, times)
    grid = [[PRIVATE if private[t][r] else (SHARED if samples[t][2][r] else UNBACKED) for t in range(len(times))]
            for r in range(len(rows))]  # fmt: skip
    # Time edges: each sample holds until the next one.
    step = (times[-1] - times[0]) / max(1, len(times) - 1) if len(times) > 1 else 0.1
    x_edges = [*times, times[-1] + step]
    # Height edges: each band's weight split evenly over its rows.
    y_edges, band_edges = [0.0], [0.0]
    for band in bands:
        n = len(band.row_ranges())
        for _ in range(n):
            y_edges.append(y_edges[-1] + band.weight / n)
        band_edges.append(y_edges[-1])

    fig, (events_ax, ax) = plt.subplots(2, 1, figsize=(11, 6.2), dpi=110, sharex=True,
                                        gridspec_kw={"height_ratios": [1, 7], "hspace": 0.08})  # fmt: skip
    ax.pcolormesh(x_edges, y_edges, grid, cmap=ListedColormap(COLORS), vmin=0, vmax=2, shading="flat")
    for edge in band_edges[1:-1]:
        ax.axhline(edge, color="black", linewidth=0.6)
    ax.set_yticks(band_edges, [_offset_label(b.offset) for b in bands] + [_offset_label(region.size)])
    ax.set_ylabel("offset in guest RAM")
    ax.set_xlabel("time since the workload started (s)")
    ax.set_xlim(x_edges[0], x_edges[-1])
    for band, lo, hi in zip(bands, band_edges, band_edges[1:], strict=False):
        ax.text(1.01, (lo + hi) / 2, band.label, transform=ax.get_yaxis_transform(), va="center", fontsize=8)

    punches = [e.ts for e in tracer.events if e.kind == "punch"]
    discards = [e.ts for e in tracer.events if e.kind == "discard"]
    events_ax.eventplot([punches, discards], lineoffsets=[1, 0], linelengths=0.8, linewidths=0.6,
                        colors=["#7a1f2b", "#1f4f7a"])  # fmt: skip
    events_ax.set_yticks([1, 0], [f"punch ({len(punches)})", f"discard ({len(discards)})"], fontsize=8)
    events_ax.set_ylim(-0.6, 1.6)
    events_ax.tick_params(axis="x", labelbottom=False)

    title = "guest-physical map over time"
    if report is not None:
        title += f" — {report.backend}, {report.vcpus} vCPUs, policy {report.policy}"
    events_ax.set_title(f"{title}\n(RAM at guest-physical {region.gpa:#x}; band heights are not to scale)",
                        fontsize=10)  # fmt: skip
    fig.legend(handles=[Patch(color=COLORS[PRIVATE], label="private (guest_memfd)"),
                        Patch(color=COLORS[SHARED], label="shared (host memory holds pages)"),
                        Patch(color=COLORS[UNBACKED], label="unbacked (neither holds pages)")],
               loc="lower center", ncol=3, frameon=False, fontsize=9)  # fmt: skip
    fig.subplots_adjust(left=0.09, right=0.85, top=0.9, bottom=0.14)
    fig.savefig(path)
    plt.close(fig)
