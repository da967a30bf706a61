"""Op microbenchmarks: verify against the reference, then time (CPU, and CUDA when present).

    python benchmarks/bench_ops.py --out benchmarks/results [--ops erode knn_vote] [--quick]
"""

import sys

from weakseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
