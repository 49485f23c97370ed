"""`python -m lcgraph.app.pictures OVERRIDES`: the graph pictures of a config, without training.

Captures the configured model on the meta device (no weights, no GPU), runs the passes for every stage
and draws each graph with lcgraph.observability.graphs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lcgraph.app.config import RunConfig, compose_config, typed
from lcgraph.graph import passes
from lcgraph.graph.capture import capture
from lcgraph.observability.graph_layout import boxes_of
from lcgraph.observability.graphs import dump_graph
from lcgraph.ops.fp8 import fp8_recipe
from lcgraph.planner.evaluation import layer_counts
from lcgraph.runtime import model


def main(argv: list[str] | None = None) -> None:
    """Capture the configured model on the meta device, run the passes, dump every graph (all stages)."""
    ap = argparse.ArgumentParser(prog="python -m lcgraph.app.pictures", description=main.__doc__)
    ap.add_argument("--out", default="graphs", help="directory for the pictures (default: graphs)")
    ap.add_argument(
        "--layer-level",
        type=int,
        action="append",
        metavar="L",
        help="also draw decoder layer L node by node (repeatable; default: each graph's first layer)",
    )
    ap.add_argument("overrides", nargs="*", help="the training config's overrides, e.g. parallel.pp=4")
    args = ap.parse_args(argv)
    out = Path(args.out)
    counts = draw(typed(compose_config(args.overrides)), out, args.layer_level)
    print(f"wrote {len(list(out.glob('*.svg')))} pictures to {out}/ (layers per stage {counts})")


def draw(cfg: RunConfig, out: Path, layer_level: list[int] | None = None) -> list[int]:
    """Capture `cfg`'s model on the meta device, run the passes of every stage, draw each graph into `out`."""
    par = cfg.parallel
    captured = capture(model.build_config(cfg.model), batch_size=cfg.data.micro_batch_size)
    counts, _ = layer_counts(par, cfg.data.seq_len, captured)

    def dump(name, gm):
        present = {b.layer for b in boxes_of(gm)[0].values() if b.part == "layer"}
        layers = None if layer_level is None else [L for L in layer_level if L in present]
        dump_graph(gm, out / name, layers=layers)

    passes.compile_stages(
        captured,
        counts,
        "meta",
        par.seq_chunks if par.schedule == "seq1f1b" else 1,
        par.sp,
        dump=dump,
        fuse=cfg.train.fuse == "on",
        cp=par.cp,
        fp8=fp8_recipe(cfg.train.fp8),
    )
    return counts


if __name__ == "__main__":
    main()
