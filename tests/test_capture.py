"""Capture: the exported graph computes HF eager's loss and gradients, and carries its annotations."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lcgraph.graph.capture import CaptureError, capture, graph_flops, retarget_device
from lcgraph.runtime import model as lcmodel

ROPE_LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def tiny_config(tied=False, rope_scaling=None):
    return LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=3,
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
    "tied,rope", [(False, None), (True, None), (False, ROPE_LLAMA3)], ids=["untied", "tied", "llama3_rope"]
)
def test_captured_graph_matches_hf_eager_loss_and_gradients(tied, rope):
    torch.manual_seed(0)
    config = tiny_config(tied, rope)
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

    captured = capture(tiny_config(tied, rope), batch_size=2)  # built on meta: the graph holds no weights
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
