"""Pictures of what lcgraph built: graph dumps per pass, drawn from the boxes of `graph_layout`.

Graphs (`dump.graphs=true` in training, or `python -m lcgraph.app.pictures OVERRIDES` without training): after
each pass `dump_graph` writes, under graphs/,

    NN_<pass>.txt           one line per node with its annotations (part, layer, role)
    NN_<pass>.svg           one box per decoder layer, plus inputs / shared / embed / norm / head / loss /
                            output boxes, with the edges between boxes; a stage's boxes take its colour;
                            badges count all-to-all (A2A), KV-relay attention (KV) and ZeRO all-gather
                            waits (AG: where the forward first reads a bucket's parameters)
    NN_<pass>.html          the same picture, self-contained; each box expands to its nodes
    NN_<pass>_layerL.svg    decoder layer L node by node (default: the graph's first layer)
"""

from __future__ import annotations

import html
import re
import sys
from collections import Counter
from pathlib import Path

from lcgraph.observability.graph_layout import BH, BW, GY, MARGIN, TOP, Box, badge_of, boxes_of, layout, si

BADGES = {"all_to_all": ("A2A", "#8e5ea2"), "kv_relay": ("KV", "#2a9d8f"), "all_gather_wait": ("AG", "#9d755d")}
PART_FILL = {
    "inputs": "#ffffff",
    "output": "#ffffff",
    "shared": "#eeeeee",
    "embed": "#d9f0d3",
    "layer": "#dbe9f6",
    "norm": "#fdebd0",
    "head": "#fdd0a2",
    "loss": "#fcbba1",
}
STAGE_COLORS = [
    "#4c78a8",
    "#f58518",
    "#54a24b",
    "#e45756",
    "#72b7b2",
    "#eeca3b",
    "#b279a2",
    "#ff9da6",
    "#9d755d",
    "#bab0ac",
]
ROLE_FILL = {
    "attention": "#c6dbef",
    "projection": "#fdd0a2",
    "mlp": "#c7e9c0",
    "norm": "#fdebd0",
    "rotary": "#d0ece9",
    "residual": "#fcbba1",
    "all_to_all": "#dadaeb",
    "embedding": "#d9f0d3",
    "head": "#fdd0a2",
    "loss": "#fcbba1",
}

NW, NH = 160, 36  # node view boxes

FAN_OUT = 3  # a box feeding this many layer boxes gets one arrow to the layer block instead


def graph_text(gm) -> str:
    lines = []
    for n in gm.graph.nodes:
        info = n.meta.get("lcgraph")
        where = "" if info is None else f"  # {info.part}{'' if info.layer is None else info.layer} {info.role}"
        target = getattr(n.target, "__name__", str(n.target))
        lines.append(f"{n.op:13s} {n.name:40s} {target}{where}")
    return "\n".join(lines) + "\n"


def _mean(xs: list[float], default: float) -> float:
    return sum(xs) / len(xs) if xs else default


def stage_from_name(name: str) -> int | None:
    m = re.search(r"stage(\d+)$", name)
    return int(m.group(1)) if m else None


# --- SVG ----------------------------------------------------------------------------------------------------


def _esc(s) -> str:
    return html.escape(str(s), quote=True)


def _lighten(color: str, keep: float = 0.3) -> str:
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return "#" + "".join(f"{int(v * keep + 255 * (1 - keep)):02x}" for v in (r, g, b))


def _svg_open(width: float, height: float) -> list[str]:
    return [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif" font-size="12">'
        ),
        (
            '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
            'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#666"/></marker></defs>'
        ),
        f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>',
    ]


def _edge(d: str, label: str = "", at=None, opacity: float = 1.0) -> str:
    out = f'<path d="{d}" fill="none" stroke="#666" stroke-width="1.2" opacity="{opacity}" marker-end="url(#arrow)"/>'
    if label and at:
        out += f'<text x="{at[0] + 4:.0f}" y="{at[1]:.0f}" font-size="10" fill="#555">{_esc(label)}</text>'
    return out


def _box_edges(boxes, edges, pos, frame, width) -> list[str]:
    out = []
    layer_targets = Counter(a for a, b in edges if boxes[b].part == "layer" and boxes[a].part != "layer")
    fanned = {a for a, n in layer_targets.items() if n >= FAN_OUT}
    n_layers = sum(b.part == "layer" for b in boxes.values())
    routes = {"left": 0, "right": 0}
    for a in fanned:  # one arrow into the layer block instead of one per layer
        ax, ay = pos[a]
        x = min(max(ax + BW / 2, frame[0] + 20), frame[0] + frame[2] - 20)
        n = layer_targets[a]
        label = f"to all {n} layers" if n == n_layers else f"to {n} layers"
        out.append(
            _edge(
                f"M{ax + BW / 2:.0f},{ay + BH:.0f} C{ax + BW / 2:.0f},{frame[1] - 10:.0f} {x:.0f},"
                f"{ay + BH + 10:.0f} {x:.0f},{frame[1]:.0f}",
                label,
                (x, frame[1] - 4),
            )
        )
    for (a, b), n in edges.items():
        if a in fanned and boxes[b].part == "layer":
            continue
        (ax, ay), (bx, by) = pos[a], pos[b]
        label = f"×{n}" if n > 1 else ""
        grid_between = frame is not None and ay < frame[1] and by > frame[1] + frame[3]
        if abs(ay - by) < 1:  # same row: side to side
            x1, x2 = (ax + BW, bx) if bx > ax else (ax, bx + BW)
            out.append(
                _edge(
                    f"M{x1:.0f},{ay + BH / 2:.0f} L{x2:.0f},{by + BH / 2:.0f}", label, ((x1 + x2) / 2, ay + BH / 2 - 4)
                )
            )
        elif by > ay + BH + GY + 20 and not grid_between:  # down past a row: leave sideways, not through it
            x1 = ax if bx + BW / 2 < ax + BW / 2 else ax + BW
            x2, y1 = bx + BW / 2, ay + BH / 2
            out.append(
                _edge(f"M{x1:.0f},{y1:.0f} C{x2:.0f},{y1:.0f} {x2:.0f},{y1:.0f} {x2:.0f},{by:.0f}", label, (x2, by - 6))
            )
        elif by > ay and not grid_between:  # downwards to the next row
            x1, y1, x2, y2 = ax + BW / 2, ay + BH, bx + BW / 2, by
            mid = (y1 + y2) / 2
            out.append(
                _edge(
                    f"M{x1:.0f},{y1:.0f} C{x1:.0f},{mid:.0f} {x2:.0f},{mid:.0f} {x2:.0f},{y2:.0f}",
                    label,
                    ((x1 + x2) / 2, mid),
                )
            )
        else:  # around the layer block (or back up): along a side margin
            side = "right" if by > ay else "left"
            routes[side] += 1
            edge_x = (width - 10 - 8 * routes[side]) if side == "right" else (10 + 8 * routes[side])
            x1 = ax + BW if side == "right" else ax
            x2 = bx + BW if side == "right" else bx
            out.append(
                _edge(
                    f"M{x1:.0f},{ay + BH / 2:.0f} L{edge_x:.0f},{ay + BH / 2:.0f} "
                    f"L{edge_x:.0f},{by + BH / 2:.0f} L{x2:.0f},{by + BH / 2:.0f}",
                    label,
                    (edge_x, (ay + by) / 2 + BH / 2),
                    opacity=0.7,
                )
            )
    return out


def _box_svg(box: Box, x: float, y: float, stage: int | None, link: bool) -> str:
    fill = PART_FILL.get(box.part, "#f4f4f4")
    stroke, sw = "#555", 1
    if stage is not None and box.part not in ("inputs", "output"):
        color = STAGE_COLORS[stage % len(STAGE_COLORS)]
        fill, stroke, sw = _lighten(color), color, 2
    roles = Counter(getattr(n.meta.get("lcgraph"), "role", n.op) for n in box.nodes)
    tip = f"{box.key}: " + ", ".join(f"{r} {c}" for r, c in roles.most_common())
    parts = [
        f'<g class="box" id="box-{box.id}"><title>{_esc(tip)}</title>',
        (
            f'<rect x="{x:.0f}" y="{y:.0f}" width="{BW}" height="{BH}" rx="6" fill="{fill}" stroke="{stroke}" '
            f'stroke-width="{sw}"/>'
        ),
        f'<text x="{x + 10:.0f}" y="{y + 20:.0f}" font-weight="bold" font-size="13">{_esc(box.key)}</text>',
        f'<text x="{x + 10:.0f}" y="{y + 38:.0f}" font-size="10" fill="#444">{_esc(box.detail())}</text>',
    ]
    bx = x + BW - 4
    for kind, count in sorted(box.badges.items(), reverse=True):
        text, color = BADGES[kind]
        label = f"{text} {count}"
        w = 8 + 6.5 * len(label)
        bx -= w + 3
        parts.append(
            f'<g class="badge {kind}"><rect x="{bx:.0f}" y="{y + 5:.0f}" width="{w:.0f}" height="15" rx="7" '
            f'fill="{color}"/><text x="{bx + w / 2:.0f}" y="{y + 16:.0f}" text-anchor="middle" '
            f'font-size="10" fill="white" font-weight="bold">{_esc(label)}</text></g>'
        )
    parts.append("</g>")
    body = "".join(parts)
    return f'<a href="#d-{box.id}">{body}</a>' if link else body


def graph_svg(gm, title: str = "", stage: int | None = None, link: bool = False) -> str:
    """The graph as boxes (one per decoder layer), edges between boxes, stage colour and badges."""
    boxes, edges, _ = boxes_of(gm)
    pos, frame, (width, height) = layout(boxes, edges)
    out = _svg_open(width, height)
    n_nodes = sum(1 for n in gm.graph.nodes if n.op != "placeholder")
    badge_total: Counter[str] = Counter()
    for b in boxes.values():
        badge_total.update(b.badges)
    sub = [f"{n_nodes} nodes in {len(boxes)} boxes"] + ([f"pipeline stage {stage}"] if stage is not None else [])
    sub += [f"{BADGES[k][0]} = {k.replace('_', ' ')} ({c})" for k, c in sorted(badge_total.items())]
    out.append(f'<text x="{MARGIN}" y="24" font-size="16" font-weight="bold">{_esc(title)}</text>')
    out.append(f'<text x="{MARGIN}" y="42" font-size="11" fill="#555">{_esc(" · ".join(sub))}</text>')
    if frame is not None:
        layers = sorted(b.layer_index for b in boxes.values() if b.part == "layer")
        out.append(
            f'<rect x="{frame[0]:.0f}" y="{frame[1]:.0f}" width="{frame[2]:.0f}" height="{frame[3]:.0f}" '
            f'rx="10" fill="none" stroke="#999" stroke-dasharray="5,4"/>'
        )
        out.append(
            f'<text x="{frame[0] + frame[2]:.0f}" y="{frame[1] - 4:.0f}" text-anchor="end" font-size="11" '
            f'fill="#555">decoder layers {layers[0]}-{layers[-1]} ({len(layers)}), in snake order</text>'
        )
    out += _box_edges(boxes, edges, pos, frame, width)
    out += [_box_svg(b, pos[k][0], pos[k][1], stage, link) for k, b in boxes.items()]
    out.append("</svg>")
    return "\n".join(out) + "\n"


def layer_svg(gm, layer: int, title: str = "") -> str:
    """Decoder layer `layer` node by node (layered by dependency), with its inputs and outputs outside it."""
    _, _, home = boxes_of(gm)
    key = f"layer {layer}"
    nodes = [n for n in gm.graph.nodes if home[n] == key and n.op != "placeholder"]
    if not nodes:
        raise ValueError(f"graph has no nodes of layer {layer}")
    inside = set(nodes)
    rank: dict = {}
    for n in nodes:
        rank[n] = 1 + max((rank[a] for a in n.all_input_nodes if a in inside), default=0)
    ext_in = {n for n in nodes if any(a not in inside and home[a] != key for a in n.all_input_nodes)}
    ext_out = {n for n in nodes if any(u not in inside for u in n.users)}
    last = max(rank.values()) + 1
    rows: list[list] = [[] for _ in range(last + 1)]
    rows[0].append("from outside")
    for n in nodes:
        rows[rank[n]].append(n)
    rows[last].append("to outside")
    width = max(len(r) for r in rows) * (NW + 14) + 2 * MARGIN
    height = TOP + len(rows) * (NH + 28) + MARGIN
    pos: dict = {}  # node (or an outside marker) -> (x, y)
    for r, row in enumerate(rows):  # each row ordered by where its inputs sit (fewer crossings)
        row.sort(
            key=lambda n: _mean(
                [pos[a][0] for a in getattr(n, "all_input_nodes", ()) if a in pos]
                + ([pos["from outside"][0]] if n in ext_in else []),
                width / 2,
            )
        )
        x0 = width / 2 - (len(row) * (NW + 14) - 14) / 2
        for i, n in enumerate(row):
            pos[n] = (x0 + i * (NW + 14), TOP + r * (NH + 28))
    out = _svg_open(width, height)
    out.append(f'<text x="{MARGIN}" y="24" font-size="16" font-weight="bold">{_esc(title or key)}</text>')
    out.append(
        f'<text x="{MARGIN}" y="42" font-size="11" fill="#555">{len(nodes)} nodes of {key}, '
        f"colour = role, parameters omitted</text>"
    )
    links = [(a, n) for n in nodes for a in n.all_input_nodes if a in inside]
    links += [("from outside", n) for n in ext_in] + [(n, "to outside") for n in ext_out]
    for a, b in links:
        (ax, ay), (bx, by) = pos[a], pos[b]
        x1, y1, x2, y2 = ax + NW / 2, ay + NH, bx + NW / 2, by
        mid = (y1 + y2) / 2
        skip = (rank.get(b, last) - rank.get(a, 0)) > 1
        out.append(
            _edge(
                f"M{x1:.0f},{y1:.0f} C{x1:.0f},{mid:.0f} {x2:.0f},{mid:.0f} {x2:.0f},{y2:.0f}",
                opacity=0.35 if skip else 0.9,
            )
        )
    for n, (x, y) in pos.items():
        if isinstance(n, str):
            out.append(
                f'<rect x="{x:.0f}" y="{y:.0f}" width="{NW}" height="{NH}" rx="{NH / 2:.0f}" fill="#fff" '
                f'stroke="#999" stroke-dasharray="4,3"/><text x="{x + NW / 2:.0f}" y="{y + 22:.0f}" '
                f'text-anchor="middle" fill="#555">{n}</text>'
            )
            continue
        info = n.meta.get("lcgraph")
        role = getattr(info, "role", "?")
        badge = badge_of(n)
        stroke, sw = (BADGES[badge][1], 3) if badge else ("#666", 1)
        target = getattr(n.target, "__name__", str(n.target))
        tip = f"{n.name} = {target}({', '.join(a.name for a in n.all_input_nodes)}) [{role}]"
        out.append(
            f"<g><title>{_esc(tip)}</title>"
            f'<rect x="{x:.0f}" y="{y:.0f}" width="{NW}" height="{NH}" rx="4" '
            f'fill="{ROLE_FILL.get(role, "#eeeeee")}" stroke="{stroke}" stroke-width="{sw}"/>'
            f'<text x="{x + 6:.0f}" y="{y + 15:.0f}" font-size="11" font-weight="bold">'
            f"{_esc(n.name[:24])}</text>"
            f'<text x="{x + 6:.0f}" y="{y + 29:.0f}" font-size="10" fill="#444">'
            f"{_esc((target + ' · ' + role)[:28])}</text></g>"
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


# --- HTML: the picture, and every box's nodes ---------------------------------------------------------------

_HTML_STYLE = """body{font-family:Helvetica,Arial,sans-serif;margin:16px;color:#222}
.pic{overflow:auto;border:1px solid #ddd;max-height:80vh}
details{margin:2px 0}summary{cursor:pointer;padding:2px}
table{border-collapse:collapse;font-size:12px;margin:4px 0 8px 18px}td,th{padding:1px 8px;text-align:left}
tr:nth-child(even){background:#f6f6f6}.b{color:white;border-radius:7px;padding:0 6px;font-size:11px;margin-left:4px}
a .box:hover rect{stroke-width:3}"""
_HTML_SCRIPT = """function openHash(){var d=document.getElementById(location.hash.slice(1));
if(d&&d.tagName==='DETAILS'){d.open=true;}}
function setAll(open){document.querySelectorAll('details').forEach(function(d){d.open=open;});}
window.addEventListener('hashchange',openHash);openHash();"""


def graph_html(gm, title: str = "", stage: int | None = None) -> str:
    """Self-contained page: the box picture (click a box to open it) and one expandable list per box."""
    boxes, _, _ = boxes_of(gm)
    parts = [
        (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
            f"<style>{_HTML_STYLE}</style></head><body><h2>{_esc(title)}</h2>"
        ),
        (
            "<p>Click a box to open its nodes. <button onclick='setAll(true)'>expand all</button> "
            "<button onclick='setAll(false)'>collapse all</button></p>"
        ),
        f"<div class='pic'>{graph_svg(gm, title, stage, link=True)}</div>",
    ]
    for box in boxes.values():
        badges = "".join(
            f"<span class='b' style='background:{BADGES[k][1]}'>{BADGES[k][0]} {c}</span>"
            for k, c in sorted(box.badges.items())
        )
        rows = []
        for n in box.nodes:
            info = n.meta.get("lcgraph")
            target = getattr(n.target, "__name__", str(n.target))
            flops = getattr(info, "flops_per_token", 0.0) or 0.0
            rows.append(
                f"<tr><td>{_esc(n.name)}</td><td>{n.op}</td><td>{_esc(target)}</td>"
                f"<td>{_esc(getattr(info, 'role', ''))}</td><td>{_esc(getattr(info, 'seq_dim', ''))}</td>"
                f"<td>{si(flops) if flops else ''}</td>"
                f"<td>{_esc(', '.join(a.name for a in n.all_input_nodes))}</td></tr>"
            )
        parts.append(
            f"<details id='d-{box.id}'><summary><b>{_esc(box.key)}</b> — {_esc(box.detail())}{badges}"
            f"</summary><table><tr><th>node</th><th>op</th><th>target</th><th>role</th><th>seq dim</th>"
            f"<th>FLOP/tok</th><th>inputs</th></tr>{''.join(rows)}</table></details>"
        )
    parts.append(f"<script>{_HTML_SCRIPT}</script></body></html>")
    return "\n".join(parts) + "\n"


def dump_graph(gm, path: Path, stage: int | None = None, layers: list[int] | None = None) -> list[Path]:
    """Write `path`.txt, .svg, .html and one node-level `path`_layerL.svg per layer in `layers`.

    `stage`: pipeline stage of the graph (colours its boxes); default: read from a name ending in stageN.
    `layers`: None = the graph's first decoder layer, [] = none. A picture that fails is reported, not raised:
    the text dump is what passes are debugged with, and a run must not die for a drawing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = [path.with_suffix(".txt")]
    written[0].write_text(graph_text(gm))
    stage = stage_from_name(path.name) if stage is None else stage
    try:
        svg, page = path.with_suffix(".svg"), path.with_suffix(".html")
        svg.write_text(graph_svg(gm, path.name, stage))
        page.write_text(graph_html(gm, path.name, stage))
        written += [svg, page]
        if layers is None:
            present = sorted({b.layer_index for b in boxes_of(gm)[0].values() if b.part == "layer"})
            layers = present[:1]
        for layer in layers:
            out = path.parent / f"{path.name}_layer{layer}.svg"
            out.write_text(layer_svg(gm, layer, f"{path.name}: layer {layer}"))
            written.append(out)
    except Exception as exc:  # noqa: BLE001
        print(f"lcgraph: warning: could not draw {path.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return written
