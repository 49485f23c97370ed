"""Pictures: graph dumps per pass (boxes per layer, stage colours, badges, node-level layers, HTML view)
and the measured timeline (gathered trace with a ZeRO track, bubble fraction)."""

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest
import torch
from torch import fx

from lcgraph.graph.capture import NodeInfo
from lcgraph.observability import graphs as viz
from lcgraph.observability import measured
from lcgraph.observability.timeline import matplotlib_available, write_trace

SVG = "{http://www.w3.org/2000/svg}"


def wait_gather(index):  # a ZeRO all-gather wait node, as zero.gather_waits inserts
    return None


def synthetic_llama(layers: int, ag_layer: int | None = None) -> fx.GraphModule:
    """A graph shaped like a captured LLaMA (annotated like capture.annotate does), `layers` deep, built in ms."""
    g = fx.Graph()

    def node(fn, args, part, layer=None, role="glue", flops=0.0):
        n = g.call_function(fn, args)
        n.meta["lcgraph"] = NodeInfo(part, layer, role, 1, flops_per_token=flops)
        return n

    def placeholder(name, part, layer=None):
        n = g.placeholder(name)
        n.meta["lcgraph"] = NodeInfo(part, layer, part, None)
        n.meta["val"] = torch.empty(8, 8, device="meta")
        return n

    ids, pos, labels = (placeholder(n, "input") for n in ("input_ids", "position_ids", "labels"))
    embed_w, head_w = placeholder("p_embed", "param"), placeholder("p_head", "param")
    weights = [placeholder(f"p_layer{i}", "param", i) for i in range(layers)]
    h = node(torch.nn.functional.embedding, (ids, embed_w), "embed", role="embedding")
    cos = node(torch.cos, (pos,), "shared", role="rotary")
    for i, w in enumerate(weights):
        if i == ag_layer:
            node(wait_gather, (0,), "layer", i, "all_gather_wait")
        q = node(torch.nn.functional.linear, (h, w), "layer", i, "projection", flops=128.0)
        a = node(torch.mul, (q, cos), "layer", i, "attention")
        h = node(torch.add, (h, a), "layer", i, "residual")
    n = node(torch.rsqrt, (h,), "norm", role="norm")
    logits = node(torch.nn.functional.linear, (n, head_w), "head", role="head")
    loss = node(torch.nn.functional.cross_entropy, (logits, labels), "loss", role="loss")
    g.output(loss)
    return fx.GraphModule(torch.nn.Module(), g)


def boxes_in(svg_text: str) -> dict[str, ET.Element]:
    root = ET.fromstring(svg_text)
    return {g.get("id").removeprefix("box-"): g for g in root.iter(f"{SVG}g") if g.get("class") == "box"}


def texts(element) -> list[str]:
    return [t.text for t in element.iter(f"{SVG}text")]


# --- graph pictures ------------------------------------------------------------------------------------------


def test_an_80_layer_graph_is_one_box_per_layer_in_a_compact_picture_with_fan_out_collapsed(tmp_path):
    files = viz.dump_graph(synthetic_llama(80, ag_layer=7), tmp_path / "01_retarget_device")
    assert [f.name for f in files] == [
        "01_retarget_device.txt",
        "01_retarget_device.svg",
        "01_retarget_device.html",
        "01_retarget_device_layer0.svg",
    ]
    text = (tmp_path / "01_retarget_device.svg").read_text()
    root = ET.fromstring(text)
    boxes = boxes_in(text)
    assert set(boxes) == {f"layer-{i}" for i in range(80)} | {
        "inputs",
        "embed",
        "shared",
        "norm",
        "head",
        "loss",
        "output",
    }
    assert float(root.get("width")) < 1800 and float(root.get("height")) < 2200  # a grid, not an 80-row column
    edges = [p for p in root.iter(f"{SVG}path") if p.get("marker-end")]
    assert len(edges) < 100  # 79 layer-to-layer arrows + a few; shared -> layers drawn once
    assert texts(root).count("to all 80 layers") == 1
    assert "AG 1" in texts(boxes["layer-7"]) and not any("AG" in t for t in texts(boxes["layer-8"]))
    assert texts(boxes["layer-3"])[1] == "3 nodes · 64 params · 128FLOP/tok"  # sums of the NodeInfo annotations


class _Details(HTMLParser):
    def __init__(self):
        super().__init__()
        self.details, self.external = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "details":
            self.details.append(attrs["id"])
        if attrs.get("src") or (attrs.get("href") or "").startswith(("http", "//")):
            self.external.append((tag, attrs))


@pytest.fixture(scope="module")
def stage_dumps(tmp_path_factory):
    """A real tiny LLaMA through every CPU pass (meta device): 2 stages, Seq1F1B with 2 chunks, Ulysses sp=2."""
    from transformers import LlamaConfig

    from lcgraph.graph.capture import capture
    from lcgraph.graph.passes import compile_stages

    out = tmp_path_factory.mktemp("graphs")
    captured = capture(
        LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    graphs = {}

    def dump(name, gm):
        graphs[name] = gm
        viz.dump_graph(gm, out / name)

    compile_stages(captured, [2, 2], "meta", seq_chunks=2, sp=2, dump=dump)
    return out, graphs


def test_every_pass_of_every_stage_is_drawn_as_text_svg_html_and_one_layer_at_node_level(stage_dumps):
    out, graphs = stage_dumps
    assert {"01_retarget_device", "02_partition_stage0", "03_kv_relay_stage1", "04_ulysses_stage1"} <= set(graphs)
    for name in graphs:
        first_layer = 2 if name.endswith("stage1") else 0
        for suffix in (".txt", ".svg", ".html", f"_layer{first_layer}.svg"):
            assert (out / f"{name}{suffix}").is_file(), f"{name}{suffix}"
        ET.parse(out / f"{name}.svg")
        ET.parse(out / f"{name}_layer{first_layer}.svg")


def test_a_stage_after_ulysses_is_coloured_by_its_stage_and_badges_all_to_alls_and_the_kv_relay(stage_dumps):
    out, _ = stage_dumps
    boxes = boxes_in((out / "04_ulysses_stage1.svg").read_text())
    assert {"layer-2", "layer-3", "shared", "norm", "head", "loss"} <= set(boxes) and "layer-0" not in boxes
    stage_color = viz.STAGE_COLORS[1]
    for layer in ("layer-2", "layer-3"):
        rect = next(boxes[layer].iter(f"{SVG}rect"))
        assert rect.get("stroke") == stage_color
        assert {"A2A 4", "KV 1"} <= set(texts(boxes[layer]))  # q, k, v in and the output back; one relay attention
    before = boxes_in((out / "02_partition_stage1.svg").read_text())
    assert not any(t.startswith(("A2A", "KV")) for t in texts(before["layer-2"]))


def test_the_html_view_is_self_contained_and_expands_each_box_to_its_nodes(stage_dumps):
    out, graphs = stage_dumps
    page = (out / "04_ulysses_stage1.html").read_text()
    parser = _Details()
    parser.feed(page)
    assert not parser.external
    assert {"d-layer-2", "d-layer-3", "d-shared", "d-inputs", "d-output"} <= set(parser.details)
    layer3 = page[page.index("id='d-layer-3'") :]
    layer3 = layer3[: layer3.index("</details>")]
    for n in graphs["04_ulysses_stage1"].graph.nodes:
        info = n.meta.get("lcgraph")
        if info is not None and info.part == "layer" and info.layer == 3 and n.op != "placeholder":
            assert f">{n.name}<" in layer3, n.name
    assert 'href="#d-layer-3"' in page  # clicking the box opens its list


def test_the_layer_level_picture_has_one_box_per_node_of_that_layer(stage_dumps, tmp_path):
    _, graphs = stage_dumps
    gm = graphs["04_ulysses_stage1"]
    viz.dump_graph(gm, tmp_path / "stage1", layers=[3])
    root = ET.parse(tmp_path / "stage1_layer3.svg").getroot()
    drawn = {t.text for t in root.iter(f"{SVG}text") if t.get("font-weight") == "bold"} - {"stage1: layer 3"}
    nodes = {
        n.name
        for n in gm.graph.nodes
        if n.op != "placeholder"
        and getattr(n.meta.get("lcgraph"), "part", None) == "layer"
        and n.meta["lcgraph"].layer == 3
    }
    assert drawn == nodes
    assert len([n for n in nodes if n.startswith(("seq_to_heads", "heads_to_seq"))]) == 4


def test_a_picture_that_cannot_be_drawn_leaves_the_text_dump_and_a_warning(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no")

    monkeypatch.setattr(viz, "graph_svg", broken)
    files = viz.dump_graph(synthetic_llama(2), tmp_path / "05_x_stage0")
    assert [f.name for f in files] == ["05_x_stage0.txt"]
    assert "could not draw 05_x_stage0" in capsys.readouterr().err


# --- measured timeline ---------------------------------------------------------------------------------------


def fake_job(timeline, events, rank=0):
    return SimpleNamespace(
        interpreter=SimpleNamespace(timeline=timeline),
        optimizer=SimpleNamespace(events=events),
        coords=SimpleNamespace(rank=rank),
        device=torch.device("cpu"),
    )


STEP1 = [
    ("F0.0", 10.0, 11.0),
    ("recv", 11.0, 11.5),
    ("B0.0", 11.5, 13.5),
    ("RS0", 13.6, 14.0),
    ("OPT", 14.0, 14.5),
    ("AG0", 14.5, 14.6),
]
EVENTS = [
    ("rs_issue", 0, 0, 2.0),  # the first one is the step before's
    ("rs_issue", 0, 0, 12.0),
    ("rs_wait", 0, 0, 14.0),
    ("ag_issue", 0, 0, 14.55),
]


def test_the_measured_timeline_is_the_last_step_as_a_trace_with_a_zero_track_and_its_bubble(tmp_path):
    stats = measured.write_measured_timeline(fake_job(STEP1, EVENTS), tmp_path, world=1)
    # pipeline time: 10.0 .. 13.5 (last B); busy F + B = 3.0 of 3.5
    assert stats["bubble_fraction"] == pytest.approx(1 - 3.0 / 3.5)
    assert stats["measured_step_s"] == pytest.approx(4.6)
    assert stats["comm_s_per_rank"] == [pytest.approx(0.5 + 0.4 + 0.1)]
    trace = json.loads((tmp_path / "timeline.json").read_text())
    assert trace["otherData"]["source"] == "measured"
    events = trace["traceEvents"]
    slices = [(e["name"], e["tid"], e["ts"], e["dur"]) for e in events if e["ph"] == "X"]
    assert slices[0] == ("F0.0", 0, 0.0, pytest.approx(1e6))
    assert ("recv", 1, pytest.approx(1e6), pytest.approx(5e5)) in slices
    zero = [e for e in events if e.get("tid") == 2]
    assert {"ph": "M", "name": "thread_name", "pid": 0, "tid": 2, "args": {"name": "ZeRO buckets"}} in zero
    assert [e["name"] for e in zero if e["ph"] == "i"] == ["rs_issue b0", "rs_wait b0", "ag_issue b0"]  # last step only
    begin, end = (e for e in zero if e["ph"] in "be")
    assert begin["name"] == "RS b0 in flight" and end["ts"] - begin["ts"] == pytest.approx(2e6)
    assert (tmp_path / "timeline.png").is_file() == matplotlib_available()


def test_ranks_on_another_host_are_aligned_at_the_barrier_and_one_hosts_ranks_keep_their_clock():
    records = [
        {"rank": 0, "host": "a", "sync": 100.0, "timeline": [("F0.0", 99.0, 99.5)], "events": []},
        {"rank": 1, "host": "a", "sync": 100.2, "timeline": [("F0.0", 99.5, 99.8)], "events": []},
        {
            "rank": 2,
            "host": "b",
            "sync": 5000.0,
            "timeline": [("F0.0", 4999.5, 4999.9)],
            "events": [("rs_issue", 0, 0, 4999.6)],
        },
    ]
    timelines, events = measured._align(records)
    assert timelines[1] == [("F0.0", 99.5, 99.8)]  # same host: same monotonic clock, no shift
    assert timelines[2] == [("F0.0", pytest.approx(99.5), pytest.approx(99.9))]
    assert events == [(2, "rs_issue", 0, 0, pytest.approx(99.6))]


def test_a_planner_timeline_in_the_run_directory_is_kept_as_timeline_predicted(tmp_path):
    (tmp_path / "plan.json").write_text("{}")
    write_trace([(0, "F0.0", 0.0, 1.0)], tmp_path / "timeline.json")
    measured.write_measured_timeline(fake_job(STEP1, []), tmp_path, world=1)
    measured.write_measured_timeline(fake_job(STEP1, []), tmp_path, world=1)  # a second write replaces the measured one
    predicted = json.loads((tmp_path / "timeline_predicted.json").read_text())
    assert "otherData" not in predicted and len([e for e in predicted["traceEvents"] if e["ph"] == "X"]) == 1
    assert json.loads((tmp_path / "timeline.json").read_text())["otherData"]["source"] == "measured"


def test_comm_times_count_p2p_and_gradient_sync_actions():
    got = measured.comm_times(STEP1)
    assert got == {"p2p_s": pytest.approx(0.5), "grad_sync_s": pytest.approx(0.5), "comm_s": pytest.approx(1.0)}


def test_stage_is_read_from_the_dump_name():
    assert viz.stage_from_name("04_ulysses_stage12") == 12 and viz.stage_from_name("01_retarget_device") is None
    assert re.fullmatch(r"#[0-9a-f]{6}", viz._lighten("#4c78a8"))


def test_the_timeline_legend_names_what_each_bar_and_its_coordinates_mean(tmp_path):
    from lcgraph.observability.timeline import legend_entries, write_timeline

    timeline = [(0, "F0.1", 0.0, 1.0), (1, "B0.1", 1.0, 2.0), (0, "sF0.1>1", 1.0, 1.5), (0, "OPT", 2.0, 2.5)]
    entries = dict(legend_entries(timeline))
    assert list(entries) == ["F", "B", "OPT"]  # the kinds present, not the wire
    assert "micro-batch m" in entries["F"] and "chunk c" in entries["B"]
    written = write_timeline(timeline, tmp_path, label="stage")
    assert "stage 1" in (tmp_path / "timeline.json").read_text() and len(written) == 2  # json and png
