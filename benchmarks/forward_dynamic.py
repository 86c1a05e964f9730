"""forward_dynamic vs forward_all on a saved DNF, side by side in one run.

Usage:
    python benchmarks/forward_dynamic.py DNF_DIR [--batch-size 256] [--repeats 100] [--threads 2]

Traffic: the ID test split, DFME-style synthetic queries (a randomly initialised DFME generator)
and uniform noise. Prints the exit histogram of each and the median-time ratio all/dynamic
(> 1 means the dynamic path is faster).
"""

from __future__ import annotations

import argparse
import json

import torch

from fortress.bench.speed import compare_forward_speed
from fortress.data import mnist_splits, noise_images
from fortress.defenses import DNF, load_defense
from fortress.generative.dfme import DFMEGenerator, to_unit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("dnf_dir")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dnf = load_defense(args.dnf_dir)
    assert isinstance(dnf, DNF), "expects a saved DNF"
    n = 4 * args.batch_size
    torch.manual_seed(0)
    gen = DFMEGenerator(nz=256, ngf=16, out_channels=1, image_size=28).eval()
    with torch.no_grad():
        dfme = to_unit(gen(torch.randn(n, 256)))
    traffic = {
        "id_test": mnist_splits().test.x[:n],
        "dfme_synthetic": dfme,
        "noise": noise_images(n).x,
    }
    for name, x in traffic.items():
        rep = compare_forward_speed(dnf.net, x, batch_size=args.batch_size, repeats=args.repeats)
        print(json.dumps({"traffic": name, **rep.as_dict()}))


if __name__ == "__main__":
    main()
