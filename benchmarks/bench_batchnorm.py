#!/usr/bin/env python
"""bnlab BatchNorm vs torch.nn.functional.batch_norm: times, ratios, fraction of copy bandwidth.

    python benchmarks/bench_batchnorm.py [--threads 1,2] [--quick] [--markdown] [--json out.json]

Same as ``bnlab bench``. See bnlab/bench/batchnorm.py for what each mode measures.
"""

import sys

from bnlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
