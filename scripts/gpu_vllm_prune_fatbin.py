"""Zero the device code that an sm_90 card (H100/H200) never loads, so the file compresses.

    python gpu_vllm_prune_fatbin.py IN.so OUT.so [--keep-sm 90]

vLLM's `_C_stable_libtorch.abi3.so` carries SASS for sm_75..sm_120 plus PTX in its `.nv_fatbin`
section (about 53 of its 79 MB). The CUDA driver picks, per kernel, the SASS image of the card's
own architecture, else JIT-compiles PTX; SASS of another major architecture is never read. This
keeps every PTX image and the SASS images of `--keep-sm`, overwrites the other SASS payloads with
zeros in place (offsets and sizes unchanged), and leaves the rest of the ELF file untouched.
The output is only good for cards of the kept architecture.

Fatbin layout used (as found in the file): a fatbin header `<I H H Q` (magic 0xBA55ED50,
version, header size, size of the entries), then entries with a header `<H H I Q` (kind: 1 PTX,
2 SASS; version; header size; payload size) and the SM number as a uint32 at byte 28.
"""

from __future__ import annotations

import argparse
import struct

FATBIN_MAGIC = 0xBA55ED50
KIND_SASS = 2


def section(data: bytes, wanted: str) -> tuple[int, int]:
    """(offset, size) of an ELF64 section by name."""
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i: int) -> tuple[int, ...]:
        return struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)

    names = header(shstrndx)[4]
    for i in range(shnum):
        h = header(i)
        name = data[names + h[0] : data.index(0, names + h[0])].decode()
        if name == wanted:
            return h[4], h[5]
    raise ValueError(f"no section {wanted!r} in this file")


def fatbin_entries(data: bytes, start: int, end: int):
    """Yield (payload offset, payload size, kind, sm) of every image in the fatbin section."""
    pos = start
    while pos + 16 <= end:
        magic, _, header_size, entries_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # fatbins are 8-byte aligned inside the section
            continue
        p, stop = pos + header_size, pos + header_size + entries_size
        while p < stop:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, p)
            (sm,) = struct.unpack_from("<I", data, p + 28)
            yield p + entry_header, payload, kind, sm
            p += entry_header + payload
        pos = stop


def prune(data: bytearray, keep_sm: set[int]) -> dict[str, int]:
    start, size = section(data, ".nv_fatbin")
    kept = zeroed = 0
    for offset, payload, kind, sm in list(fatbin_entries(data, start, start + size)):
        if kind == KIND_SASS and sm not in keep_sm:
            data[offset : offset + payload] = bytes(payload)
            zeroed += payload
        else:
            kept += payload
    if not kept:
        raise ValueError("no image kept: is this a CUDA extension?")
    return {"kept_bytes": kept, "zeroed_bytes": zeroed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--keep-sm", default="90", help="comma-separated SM numbers to keep")
    args = parser.parse_args()
    data = bytearray(open(args.src, "rb").read())
    stats = prune(data, {int(s) for s in args.keep_sm.split(",")})
    with open(args.dst, "wb") as f:
        f.write(data)
    print(
        f"{args.dst}: kept {stats['kept_bytes'] / 1e6:.1f} MB of device code, "
        f"zeroed {stats['zeroed_bytes'] / 1e6:.1f} MB"
    )


if __name__ == "__main__":
    main()
