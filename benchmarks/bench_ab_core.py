#!/usr/bin/env python3
"""A/B of the C core between two built checkouts, in one run: forward of one 256x256 patch (batch 1)
and one training step (batch 2 at 128x128, frozen batch norms), each measurement in its own child
process, the checkouts alternating round by round so that drifts of the machine hit both alike.
Reports the best time of each and the ratio B/A per round. Both checkouts must be built in place
(tools/dev_build.sh); the published weights are used, so that old and new compute the same network.

    git worktree add /tmp/base <commit> && (cd /tmp/base && tools/dev_build.sh)
    python3 benchmarks/bench_ab_core.py /tmp/base . [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from deepspot_napari import _core
from deepspot_napari.model import bundled_weights_path
network = _core.Network(str(bundled_weights_path("hybrid")))
rng = np.random.default_rng(0)
x = rng.random((1, 256, 256, 1)).astype(np.float32)
def best(call, n):
    call()
    times = []
    for _ in range(n):
        start = time.perf_counter(); call(); times.append(time.perf_counter() - start)
    return min(times)
forward = best(lambda: network.forward(x), 9)
trainer = _core.Trainer(network, dropout=0.0, batch_norm="frozen")
xb = rng.random((2, 128, 128)).astype(np.float32)
tb = rng.random((2, 128, 128)).astype(np.float32) * 0.5
step = best(lambda: trainer.step(xb, tb), 3)
print(json.dumps({"forward_ms": forward * 1e3, "step_s": step}))
"""


def measure(root: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(root)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="checkout A (the base), built in place")
    parser.add_argument("b", type=Path, help="checkout B (the change), built in place")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runs = {"a": [], "b": []}
    for r in range(args.rounds):
        for key in ("a", "b"):
            runs[key].append(measure(getattr(args, key).resolve()))
        print(f"round {r + 1}: " + ", ".join(f"{k}/a {runs['b'][-1][k] / runs['a'][-1][k]:.3f}" for k in runs["a"][-1]),
              file=sys.stderr, flush=True)
    print("| measure | A (best) | B (best) | B / A per round |")
    print("|---|---:|---:|---|")
    for key, label in (("forward_ms", "forward, one 256x256 patch, ms"), ("step_s", "training step, batch 2 at 128x128, s")):
        a, b = [x[key] for x in runs["a"]], [x[key] for x in runs["b"]]
        print(f"| {label} | {min(a):.3g} | {min(b):.3g} | {' / '.join(f'{y / x:.3f}' for x, y in zip(a, b))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
