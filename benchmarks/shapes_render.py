"""Throughput of the Shapes-world renderer (scene sampling + rendering + PNG writing). Prints JSON.

    python benchmarks/shapes_render.py [--count 2000]
"""

import argparse
import json
import tempfile
import time

from arrag.shapes.dataset import ShapesConfig, write_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        write_split(folder, "database", args.count, ShapesConfig(image_size=args.image_size))
        elapsed = time.perf_counter() - started
    print(json.dumps({"benchmark": "shapes_render", "images": args.count, "image_size": args.image_size,
                      "seconds": round(elapsed, 3), "images_per_second": round(args.count / elapsed, 1)}))


if __name__ == "__main__":
    main()
