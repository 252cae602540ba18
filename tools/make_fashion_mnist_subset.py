"""Build the Fashion-MNIST subset the tests use (tests/data/fashion_mnist/) from the full
data set (Debian: `apt-get install dataset-fashion-mnist`):

    .venv/bin/python tools/make_fashion_mnist_subset.py [--root DIR] [--out DIR]

The first 32 training and 16 test images of every class, in file order: 320 + 160 images
in the same gzipped idx format, so the suite reads them with the reader the apps use and
needs no apt package. Fashion-MNIST is (c) 2017 Zalando SE, MIT licence (see the README
written beside the files). Rebuilding gives the same bytes (gzip without a time stamp).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from sparse_mae.data.fashion_mnist import DEFAULT_ROOT, SPLITS, FashionMnist, class_balanced_indices, write_idx

PER_CLASS = {"train": 32, "test": 16}
LICENCE = """# Fashion-MNIST subset (test data)

The first {train} training and {test} test images of each of the 10 classes of Fashion-MNIST,
in file order, in the original gzipped idx format; built by `tools/make_fashion_mnist_subset.py`
from Debian's `dataset-fashion-mnist`.

Fashion-MNIST: Copyright (c) 2017 Zalando SE, https://github.com/zalandoresearch/fashion-mnist,
released under the MIT licence:

Permission is hereby granted, free of charge, to any person obtaining a copy of this software
and associated documentation files (the "Software"), to deal in the Software without
restriction, including without limitation the rights to use, copy, modify, merge, publish,
distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=DEFAULT_ROOT)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests" / "data" / "fashion_mnist"))
    args = ap.parse_args()
    out = Path(args.out)
    for split, prefix in SPLITS.items():
        full = FashionMnist(args.root, split)
        keep = class_balanced_indices(full.labels, PER_CLASS[split])
        write_idx(out / f"{prefix}-images-idx3-ubyte.gz", full.images[keep])
        write_idx(out / f"{prefix}-labels-idx1-ubyte.gz", full.labels[keep])
        print(f"{split}: {len(keep)} images -> {out}")
    (out / "README.md").write_text(LICENCE.format(**PER_CLASS))


if __name__ == "__main__":
    main()
