"""Code packing on an 8B Llama's largest linear: the 4-bit nibble path and the int32 words
reinterpreted in place (core/quant/packing.py) against the generic int64 bit-field path, on the
same codes, in one run. An export unpacks every layer's checkpointed codes and packs them again
(compressed-tensors int32 words for hf), so this is most of an 8B export's time.

    .venv/bin/python bench/bench_packing.py [--rows 14336 --cols 4096 --threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.quant import packing  # noqa: E402

CHUNK = 512  # rows per call, as core/streaming/checkpoints.py packs them


def seconds(fn, codes: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    t0 = time.perf_counter()
    out = [fn(codes[i : i + CHUNK]) for i in range(0, codes.shape[0], CHUNK)]
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=14336)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    codes = torch.randint(0, 16, (args.rows, args.cols), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    n = args.cols
    cases = [
        ("pack uint8", lambda c: packing._pack_bitfields(c, 4), lambda c: packing.pack_codes(c, 4), codes),
        (
            "unpack uint8",
            lambda p: packing._unpack_bitfields(p, 4, n),
            lambda p: packing.unpack_codes(p, 4, n),
            packing.pack_codes(codes, 4),
        ),
    ]
    print(f"4-bit codes [{args.rows}, {args.cols}], {args.threads} threads, {CHUNK} rows per call")
    print("| operation | generic s | ours s | generic / ours | same bytes |")
    print("|---|---|---|---|---|")
    for name, generic, ours, data in cases:
        t_gen, out_gen = seconds(generic, data)
        t_ours, out_ours = seconds(ours, data)
        same = all(torch.equal(a, b) for a, b in zip(out_gen, out_ours, strict=True))
        print(f"| {name} | {t_gen:.2f} | {t_ours:.2f} | {t_gen / t_ours:.1f} | {same} |", flush=True)
    # int32 words: arithmetic (any byte order) against the in-place reinterpretation
    little = packing._LITTLE_ENDIAN
    packing._LITTLE_ENDIAN = False
    t_gen, out_gen = seconds(lambda c: packing.pack_int32(c, 4), codes)
    packing._LITTLE_ENDIAN = little
    t_ours, out_ours = seconds(lambda c: packing.pack_int32(c, 4), codes)
    same = all(torch.equal(a, b) for a, b in zip(out_gen, out_ours, strict=True))
    label = "pack int32 (words built arithmetically vs the bytes reinterpreted)"
    print(f"| {label} | {t_gen:.2f} | {t_ours:.2f} | {t_gen / t_ours:.1f} | {same} |")


if __name__ == "__main__":
    main()
