"""Disassembly of guest code (iced ``Decoder`` + Intel ``Formatter``) for debugging listings."""

from __future__ import annotations

from iced_x86 import Decoder, Formatter, FormatterSyntax


def disassemble(
    code: bytes,
    base: int,
    labels: dict[str, int] | None = None,
    data_ranges: tuple[tuple[int, int], ...] = (),
) -> str:
    """One line per instruction: ``address  bytes  text``, with label lines and data shown as ``db``.

    ``data_ranges`` (absolute [start, end) pairs) are printed as bytes instead of being decoded, so strings
    and tables in a program do not desynchronise the listing.
    """
    by_addr: dict[int, list[str]] = {}
    for name, addr in (labels or {}).items():
        by_addr.setdefault(addr, []).append(name)
    formatter = Formatter(FormatterSyntax.INTEL)
    lines: list[str] = []
    pos = 0
    ranges = sorted(data_ranges)
    while pos < len(code):
        ip = base + pos
        lines.extend(f"{n}:" for n in by_addr.get(ip, []))
        data_end = next((end for start, end in ranges if start <= ip < end), None)
        if data_end is not None:
            chunk = code[pos : min(pos + 16, data_end - base)]
            lines.append(f"  {ip:016x}  {chunk.hex():<32}  db {chunk!r}")
            pos += len(chunk)
            continue
        stop = min((s - base for s, _ in ranges if s > ip), default=len(code))
        decoder = Decoder(64, code[pos:stop], ip=ip)
        instr = decoder.decode()
        size = max(instr.len, 1)
        lines.append(f"  {ip:016x}  {code[pos : pos + size].hex():<32}  {formatter.format(instr)}")
        pos += size
    lines.extend(f"{n}:" for n in by_addr.get(base + len(code), []))
    return "\n".join(lines)
