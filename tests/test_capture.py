"""Capture: the exported graph computes HF eager's loss and gradients, and carries its annotations."""

import copy

import pytest
import torch
from torch.utils._pytree import tree_map
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config

from lcgraph.graph import passes
from lcgraph.graph.capture import EXPORTED_LAYERS, CaptureError, capture, graph_flops
from lcgraph.graph.passes import retarget_device
from lcgraph.graph.repeat import grow_layers
from lcgraph.observability.graphs import graph_text
from lcgraph.runtime import model as lcmodel

ROPE_LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def tiny_config(tied=False, rope_scaling=None, layers=3):
    return LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        rope_scaling=rope_scaling,
        attention_dropout=0.0,
    )


def run_captured(captured, hf, ids, pos, labels):
    """Run the captured graph with HF's own parameter tensors (as leaves) and return loss and grads."""
    retarget_device(captured.gm, torch.device("cpu"))
    named = dict(hf.named_parameters())
    params = {ph: named[name].detach().clone().requires_grad_(True) for ph, name in captured.param_names.items()}
    buffers = lcmodel.rotary_buffers(hf.config, captured.buffer_names.values(), "cpu")
    kwargs = {
        **params,
        **{ph: buffers[n] for ph, n in captured.buffer_names.items()},
        "input_ids": ids,
        "position_ids": pos,
        "labels": labels,
    }
    out = captured.gm(**kwargs)
    loss_sum = out[0] if isinstance(out, (tuple, list)) else out
    loss = loss_sum / labels.numel()
    loss.backward()
    return loss, {captured.param_names[ph]: p.grad for ph, p in params.items()}


@pytest.mark.parametrize(
    "tied,rope,layers",
    [(False, None, 3), (True, None, 3), (False, ROPE_LLAMA3, 3), (True, ROPE_LLAMA3, 5)],
    ids=["untied", "tied", "llama3_rope", "grown"],  # grown: 5 layers, 2 of them grown from the export of 3
)
def test_captured_graph_matches_hf_eager_loss_and_gradients(tied, rope, layers):
    torch.manual_seed(0)
    config = tiny_config(tied, rope, layers)
    hf = LlamaForCausalLM(config).float()
    hf.config._attn_implementation = "sdpa"
    seq = 40
    ids = torch.randint(0, config.vocab_size, (2, seq))
    pos = torch.arange(seq).expand(2, -1)
    labels = torch.randint(0, config.vocab_size, (2, seq))
    ref = torch.nn.functional.cross_entropy(
        hf(input_ids=ids, position_ids=pos).logits.float().flatten(0, 1), labels.flatten()
    )
    ref.backward()
    ref_grads = {n: p.grad for n, p in hf.named_parameters()}

    captured = capture(tiny_config(tied, rope, layers), batch_size=2)  # built on meta: the graph holds no weights
    assert captured.exported_layers == min(layers, EXPORTED_LAYERS)
    loss, grads = run_captured(captured, hf, ids, pos, labels)

    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    expected = {n for n in ref_grads if not (tied and n == "lm_head.weight")}
    assert set(grads) == expected
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_attention_is_one_custom_op_per_layer_and_masks_are_gone():
    captured = capture(tiny_config())
    targets = [n.target for n in captured.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.lcgraph.attention.default) == 3
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets
    names = {getattr(t, "__name__", str(t)) for t in targets}
    assert not any("mask" in n or "tril" in n or "triu" in n for n in names)


def test_every_node_is_annotated_with_part_role_seq_dim_and_costs():
    captured = capture(tiny_config())
    infos = [n.meta["lcgraph"] for n in captured.graph.nodes]
    assert {i.part for i in infos} >= {"param", "input", "embed", "layer", "norm", "head", "loss"}
    assert {i.layer for i in infos if i.part == "layer"} == {0, 1, 2}
    roles = {i.role for i in infos}
    assert roles >= {"attention", "projection", "mlp", "norm", "rotary", "embedding", "head", "loss"}
    attn = [i for i in infos if i.role == "attention"]
    assert all(i.seq_dim == 2 and i.flops_per_pair == 4 * 8 * 8 for i in attn)  # 8 heads x head_dim 8
    q_proj = next(n for n in captured.graph.nodes if n.meta["lcgraph"].role == "projection")
    assert q_proj.meta["lcgraph"].seq_dim == 1 and q_proj.meta["lcgraph"].flops_per_token == 2 * 64 * 64
    # matmul FLOPs of the whole model: 2 * params (non-embedding) per token, plus causal attention pairs
    c = tiny_config()
    per_layer = 2 * (c.hidden_size * (c.hidden_size * 2 + 2 * 16) + 3 * c.hidden_size * c.intermediate_size)
    head = 2 * c.hidden_size * c.vocab_size
    seq = 100
    expected = seq * (3 * per_layer + head) + 3 * 4 * 8 * 8 * seq * (seq + 1) / 2
    assert graph_flops(captured, seq) == pytest.approx(expected)


def test_non_llama_model_is_refused_with_a_clear_message():
    from transformers import GPT2Config

    with pytest.raises(CaptureError, match="not LLaMA-like"):
        capture(GPT2Config(n_layer=1))


def test_fused_linear_cross_entropy_matches_the_unfused_head_and_loss():
    from lcgraph.graph import passes

    torch.manual_seed(0)
    config = tiny_config()
    hf = LlamaForCausalLM(config).float()
    ids, labels = torch.randint(0, 97, (2, 40)), torch.randint(0, 97, (2, 40))
    labels[0, -5:] = -100  # ignored targets stay ignored
    pos = torch.arange(40).expand(2, -1)
    results = []
    for fuse in (False, True):
        captured = capture(tiny_config(), batch_size=2)
        (stage,) = passes.compile_stages(captured, [3], "cpu", 1, 1, fused_loss=fuse).values()
        targets = [n.target for n in stage.gm.graph.nodes]
        assert (torch.ops.aten.cross_entropy_loss.default not in targets) == fuse
        captured.gm = stage.gm
        captured.param_names, captured.buffer_names = stage.param_names, stage.buffer_names
        results.append(run_captured(captured, hf, ids, pos, labels))
    (loss_ref, grads_ref), (loss, grads) = results
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("group", [1, 2])
def test_segment_layers_cuts_one_submodule_per_layer_group_with_the_same_loss_and_gradients(group):
    """The pass recompute runs on: embed, one segment per `group` layers (one attention per layer), head; same
    result, op for op."""
    from lcgraph.graph.passes import segment_layers

    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_config()).float()
    ids, labels = torch.randint(0, 97, (2, 24)), torch.randint(0, 97, (2, 24))
    pos = torch.arange(24).expand(2, -1)
    whole = capture(tiny_config(), batch_size=2)
    segmented = capture(tiny_config(), batch_size=2)
    segmented.gm, layers = segment_layers(segmented.gm, group)

    want = {1: {"layer_0": [0], "layer_1": [1], "layer_2": [2]}, 2: {"layer_0": [0, 1], "layer_2": [2]}}[group]
    assert layers == want
    assert [name for name, _ in segmented.gm.named_children()] == ["embed", *want, "head"]
    for name, members in layers.items():
        targets = [n.target for n in getattr(segmented.gm, name).graph.nodes]
        assert targets.count(torch.ops.lcgraph.attention.default) == len(members), name
    loss, grads = run_captured(whole, hf, ids, pos, labels)
    seg_loss, seg_grads = run_captured(segmented, hf, ids, pos, labels)
    assert torch.equal(seg_loss, loss)
    assert seg_grads.keys() == grads.keys() and all(torch.equal(seg_grads[n], g) for n, g in grads.items())


def described(captured) -> dict:
    """All of a captured graph that lcgraph, a pass or a picture can read: each node (op, name, target, arguments,
    every metadata key with tensors as shape, dtype and strides), the code, the placeholders' HF names, and the
    graph's table of used names, from which the passes name the nodes they add."""

    def sig(v):
        return ("tensor", str(v.shape), v.dtype, str(v.stride())) if isinstance(v, torch.Tensor) else v

    nodes = []
    for n in captured.graph.nodes:
        args = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: f"%{a.name}")
        nodes.append(
            (n.op, n.name, str(n.target), n.type, str(args), {k: str(tree_map(sig, v)) for k, v in n.meta.items()})
        )
    names = captured.graph._graph_namespace
    return {
        "nodes": nodes,
        "code": captured.gm.code,
        "param_names": list(captured.param_names.items()),
        "buffer_names": list(captured.buffer_names.items()),
        "used_names": sorted(names._used_names),
        "name_counters": sorted(names._base_count.items()),
        "config": captured.config.to_dict(),
    }


@pytest.mark.parametrize(  # 12: two-digit layer indices; bf16: the trainer's capture (HF casts in norms and rotary)
    "layers, tied, batch, dtype", [(5, False, 1, torch.float32), (12, True, 2, torch.bfloat16)]
)
def test_a_grown_capture_is_the_export_of_every_layer_node_for_node(layers, tied, batch, dtype):
    grown = capture(tiny_config(tied, layers=layers), batch_size=batch, dtype=dtype)
    whole = capture(tiny_config(tied, layers=layers), batch_size=batch, dtype=dtype, whole=True)
    assert (grown.exported_layers, whole.exported_layers) == (EXPORTED_LAYERS, layers)
    assert described(grown) == described(whole)
    # the passes add nodes named from the graph's name table: every stage comes out the same
    stages = [passes.compile_stages(c, [2, layers - 2], "meta", 2, 2) for c in (grown, whole)]
    assert [graph_text(s.gm) for s in stages[0].values()] == [graph_text(s.gm) for s in stages[1].values()]


def test_layers_that_differ_by_config_are_exported_whole():
    sliding = Qwen2Config(  # a sliding window on the first two layers only
        vocab_size=97,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=5,
        num_attention_heads=8,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=2,
    )
    assert capture(sliding).exported_layers == 5


def test_grow_layers_leaves_a_graph_whose_last_layers_differ_as_it_is():
    captured = capture(tiny_config())  # 3 layers, exported
    layer_of = {n.name: n.meta["lcgraph"].layer for n in captured.graph.nodes}
    for n in captured.graph.nodes:
        del n.meta["lcgraph"]  # the annotations name the layer: export's graph has none

    def grow(gm):
        return grow_layers(gm, captured.param_names, captured.buffer_names, 3, 5, lambda n: layer_of[n.name])

    assert grow(copy.deepcopy(captured.gm)) is not None  # as exported, the layers repeat
    changed = copy.deepcopy(captured.gm)
    eps = next(n for n in changed.graph.nodes if layer_of[n.name] == 2 and n.args[1:] == (1e-6,))
    eps.args = (eps.args[0], 1e-5)  # layer 2's first RMSNorm epsilon
    before = graph_text(changed)
    assert grow(changed) is None
    assert graph_text(changed) == before
