"""The `fp8_matmuls` pass: the decoder layers' linears -> `lcgraph.ops.fp8.fp8_linear` (train.fp8).

HF LLaMA's seven projections per layer (q, k, v, o, gate, up, down) export as `aten.linear(x, weight)` with no
bias; the pass points each one's users at an `fp8_linear(x, weight, recipe)` node that carries its annotations.
The LM head stays in the stage's dtype (it feeds the fused loss, and its logits decide the loss's precision), and
so do the embeddings (a gather, no matmul). Linears with a bias (not LLaMA's) are left as they are.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from lcgraph.ops.fp8 import RECIPES, fp8_linear

aten = torch.ops.aten


def fp8_matmuls(gm: fx.GraphModule, recipe: str) -> int:
    """Rewrite every bias-free linear of a decoder layer in `gm` to FP8 under `recipe`; returns how many."""
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r} unknown; choose one of {RECIPES}")
    graph, done = gm.graph, 0
    for node in list(graph.nodes):
        info = node.meta.get("lcgraph")
        if node.target != aten.linear.default or info is None or info.part != "layer" or len(node.args) != 2:
            continue
        with graph.inserting_before(node):
            new = graph.call_function(fp8_linear, (*node.args, recipe))
        new.meta = {k: v for k, v in node.meta.items() if k in ("val", "lcgraph", "nn_module_stack", "stack_trace")}
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        done += 1
    graph.lint()
    gm.recompile()
    return done
