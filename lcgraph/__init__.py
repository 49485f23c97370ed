"""lcgraph: HF LLaMA models compiled into per-rank programs for very long sequences (README.md)."""

import logging

# transformers imports torchao whenever it is installed (its quantizers), and torchao warns at import about
# kernels it cannot load on a machine without CUDA or Triton; lcgraph uses none of them (torchao is the FP8
# tests' reference), so their warnings would only bury lcgraph's own output.
logging.getLogger("torchao").setLevel(logging.ERROR)
