"""`lcgraph-export RUN_OR_CHECKPOINT OUT_DIR`: a full-state checkpoint of any layout as an HF model directory.

OUT_DIR gets config.json, safetensors shards (with an index when there are several) and the tokenizer, and
loads with `LlamaForCausalLM.from_pretrained(OUT_DIR)` or back into lcgraph with `model.path=OUT_DIR`.
RUN_OR_CHECKPOINT is a run directory (its newest complete checkpoint), its `checkpoints/`, or one checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lcgraph.app.cli import one_line_errors
from lcgraph.runtime.checkpoint import export_hf


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lcgraph-export", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a run directory, its checkpoints/, or one checkpoint")
    parser.add_argument("out", type=Path, help="a new directory for the HF model")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file (default 5)")
    args = parser.parse_args(argv)
    with one_line_errors("lcgraph-export", sweep_goes_on=False):
        ckpt = export_hf(args.source, args.out, int(args.max_shard_gb * 2**30))
        print(f"exported {ckpt} to {args.out}")


if __name__ == "__main__":
    main()
