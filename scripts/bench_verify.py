"""Start-up cost of verifying an artifact's files: a full sha256 pass versus the recorded check.

Writes a synthetic file of ``--gb`` GiB (random bytes, as an engine's weights are incompressible), lists it as a
manifest file entry, then times ``Verifier(mode).check`` ``--repeat`` times per mode, alternating the modes in one
run so both see the same machine load. The page cache is warm after the first pass (a cold disk makes the full
hash slower still). Prints the medians and the ratio.

    python scripts/bench_verify.py --gb 2 --repeat 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    from dtcompile.core.digests import sha256_file
    from dtcompile.manifest import Verifier

    with tempfile.TemporaryDirectory() as d:
        os.environ["DTC_CACHE_DIR"] = str(Path(d) / "cache")
        art = Path(d) / "art"
        (art / "engines").mkdir(parents=True)
        path = art / "engines" / "transformer.engine"
        chunk = os.urandom(64 << 20)
        with open(path, "wb") as f:
            for _ in range(int(args.gb * 1024 / 64)):
                f.write(chunk)
        entry = {"file": "engines/transformer.engine", "sha256": sha256_file(path), "size": path.stat().st_size}
        Verifier(art).record_written([entry])
        times: dict[str, list[float]] = {"full": [], "recorded": []}
        for _ in range(args.repeat):
            for mode in times:
                t0 = time.perf_counter()
                Verifier(art, mode).check(entry)
                times[mode].append(time.perf_counter() - t0)
        full, rec = (statistics.median(times[m]) for m in ("full", "recorded"))
        print(f"file {entry['size'] / 2**30:.2f} GiB, {args.repeat} runs per mode (medians)")
        print(f"  full sha256     {full * 1000:10.1f} ms")
        print(f"  recorded check  {rec * 1000:10.3f} ms")
        print(f"  ratio full / recorded: {full / rec:,.0f}x")


if __name__ == "__main__":
    main()
