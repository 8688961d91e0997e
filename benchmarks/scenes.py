"""Generation speed of the synthetic ``scenes`` data set (images per second, one process).

Renders ``--images`` scenes in chunks of ``--chunk`` with ``--threads`` intra-op threads
(default 1: the per-core speed) and prints images per wall-clock second and per CPU second
(the process's CPU time: the per-core speed even on a machine shared with other jobs), best
of ``--repeats``.

    python benchmarks/scenes.py                               # 32 px, 1 thread
    python benchmarks/scenes.py --image-size 64 --max-objects 5 --threads 2
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--min-objects", type=int, default=1)
    parser.add_argument("--max-objects", type=int, default=3)
    parser.add_argument("--hold-out", nargs="*", default=[], help="e.g. 'green triangle'")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from selfsup.data.scenes import generate_scenes, parse_hold_out

    torch.set_num_threads(args.threads)
    table = parse_hold_out(args.hold_out)

    def run(n: int) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        generate_scenes(
            n,
            image_size=args.image_size,
            min_objects=args.min_objects,
            max_objects=args.max_objects,
            hold_out=table,
            chunk=args.chunk,
        )
        return time.perf_counter() - start, time.process_time() - cpu

    run(64)  # warm-up
    times = [run(args.images) for _ in range(args.repeats)]
    best, best_cpu = min(t[0] for t in times), min(t[1] for t in times)
    print(
        f"scenes {args.image_size}px, {args.min_objects}-{args.max_objects} objects, "
        f"{args.threads} thread(s), chunk {args.chunk}: {args.images / best:.0f} images/s wall-clock, "
        f"{args.images / best_cpu:.0f} images per CPU second"
    )


if __name__ == "__main__":
    main()
