"""Op microbenchmarks: verify against the reference, then time (CPU, and CUDA when present).

    python benchmarks/bench_ops.py --out benchmarks/results [--ops erode knn_vote] [--quick]

The cases and peers (reference, torch mm+topk, FAISS IndexFlatIP, OpenCV) are weakseg.bench's; on the
CPU they include ModuSeg's real knn_vote shapes and a P x K grid of refine_propagate.
"""

import sys

from weakseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
