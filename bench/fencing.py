"""What fencing costs the chief: a journal-sized write, plain vs through the lock's Fence.

    .venv/bin/python -m bench.fencing [--writes 300] [--size 2048]

Starts fake-gcs-server (skin.infra.emulator, memory backend) in this process and
writes ``--writes`` objects of ``--size`` bytes to a ring of 64 slots (as the
journal does) three ways: unconditional ``Storage.write_bytes``, with
``if_generation_match`` (the generation last written), and through
:class:`skin.tuning.lock.Fence` (lock check + precondition). Prints the median
and p95 per write in ms, as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--writes", type=int, default=300)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()

    from skin.infra.emulator import Emulator
    from skin.infra.storage import Storage
    from skin.tuning.lock import ChiefLock, Fence

    data = os.urandom(args.size)
    out = {"writes": args.writes, "size": args.size}
    with Emulator(bucket="bench-fencing") as emu:
        os.environ.update(emu.environ())
        storage = Storage()
        root = "gs://bench-fencing"
        lock = ChiefLock(storage, f"{root}/lock.json", 60).acquire(wait=False).start()
        fence = Fence(storage, lock)
        generations: dict[str, int] = {}

        def plain(uri):
            storage.write_bytes(uri, data)

        def conditional(uri):
            generations[uri] = storage.write_bytes(uri, data,
                                                   if_generation_match=generations.get(uri, 0))

        def fenced(uri):
            fence.write_bytes(uri, data)

        for name, write in (("plain", plain), ("if_generation_match", conditional),
                            ("fence", fenced)):
            times = []
            for i in range(args.writes):
                uri = f"{root}/{name}/journal/{i % 64:04d}.json"
                t0 = time.perf_counter()
                write(uri)
                times.append((time.perf_counter() - t0) * 1e3)
            times.sort()
            out[name] = {"median_ms": round(statistics.median(times), 2),
                         "p95_ms": round(times[int(0.95 * len(times)) - 1], 2)}
        lock.release()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
