"""The graph collapsed for its pictures: one box per decoder layer (plus inputs / shared / embed / norm /
head / loss / output boxes), the tensors crossing between boxes, and where each box goes on the canvas
(inputs and shared on top, decoder layers in a snaking grid, head side below). `graphs` draws them.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

from lcgraph.ops.relay import relay_attention

BW, BH, GX, GY, MARGIN, TOP = 236, 50, 26, 36, 20, 58  # box view geometry (px)

GRID_COLS = 6


# --- boxes: the graph collapsed per decoder layer ----------------------------------------------------------


@dataclass
class Box:
    key: str  # "layer 3", "embed", "shared", "inputs", ...
    part: str
    layer: int | None
    nodes: list = field(default_factory=list)
    params: int = 0  # parameter elements of the placeholders folded into this box
    flops_per_token: float = 0.0
    badges: Counter = field(default_factory=Counter)

    @property
    def layer_index(self) -> int:
        """The decoder layer of a box with part == "layer"."""
        assert self.layer is not None  # layer boxes always carry their index
        return self.layer

    @property
    def id(self) -> str:
        return re.sub(r"[^A-Za-z0-9_-]", "-", self.key)

    def detail(self) -> str:
        if self.part == "inputs":
            return ", ".join(n.name for n in self.nodes if getattr(n.meta.get("lcgraph"), "part", "") != "buffer")
        parts = [f"{sum(n.op != 'placeholder' for n in self.nodes)} nodes"]
        if self.params:
            parts.append(f"{si(self.params)} params")
        if self.flops_per_token:
            parts.append(f"{si(self.flops_per_token)}FLOP/tok")
        return " · ".join(parts)


def badge_of(node) -> str | None:
    """all_to_all (Ulysses), kv_relay (Seq1F1B attention) or all_gather_wait (ZeRO), for the badges; else None."""

    info = node.meta.get("lcgraph")
    role = getattr(info, "role", None)
    if role == "all_to_all":
        return "all_to_all"
    if node.target is relay_attention:
        return "kv_relay"
    if role == "all_gather_wait":
        return "all_gather_wait"
    return None


def _home(node) -> str | None:
    """The box a node belongs to; None: decided by its neighbours (shared parameters, unannotated nodes)."""
    info = node.meta.get("lcgraph")
    if node.op == "output":
        return "output"
    if node.op == "placeholder":
        if info is not None and info.part in ("param", "buffer"):
            return f"layer {info.layer}" if info.layer is not None else None
        return "inputs"  # input_ids, position_ids, labels, hidden_in (which carries its producer's meta)
    if info is None:
        return None
    return f"layer {info.layer}" if info.part == "layer" and info.layer is not None else info.part


def boxes_of(gm) -> tuple[dict[str, Box], Counter, dict]:
    """Boxes in order of first appearance, edges (a, b) -> number of tensors crossing, node -> box key."""
    home: dict = {}
    nodes = list(gm.graph.nodes)
    for n in nodes:  # graph order: a node's inputs already have a home
        home[n] = _home(n)
        if home[n] is None and n.op != "placeholder":
            home[n] = next((home[a] for a in n.all_input_nodes if home.get(a)), None)
    for n in nodes:  # parameters and buffers of no layer live with their first user (unused ones: inputs)
        if home[n] is None:
            home[n] = next((home[u] for u in n.users if home.get(u)), "inputs" if n.op == "placeholder" else "other")
    first: dict[str, int] = {}  # boxes in order of their first computing node; inputs (placeholders only) first
    for i, n in enumerate(nodes):
        first.setdefault(home[n], i if n.op != "placeholder" else -1)
        if n.op != "placeholder" and first[home[n]] == -1 and home[n] != "inputs":
            first[home[n]] = i
    boxes: dict[str, Box] = {}
    for n in sorted(nodes, key=lambda n: first[home[n]]):
        key = home[n]
        if key not in boxes:
            layer = int(key.split()[1]) if key.startswith("layer ") else None
            boxes[key] = Box(key, "layer" if layer is not None else key, layer)
        box = boxes[key]
        box.nodes.append(n)
        info = n.meta.get("lcgraph")
        if n.op == "placeholder" and getattr(info, "part", None) == "param":
            box.params += _numel(n)
        box.flops_per_token += getattr(info, "flops_per_token", 0.0) or 0.0
        badge = badge_of(n)
        if badge:
            box.badges[badge] += 1
    crossing = {(home[a], home[n], a) for n in nodes for a in n.all_input_nodes if home[a] != home[n]}
    edges = Counter((a, b) for a, b, _ in crossing)
    return boxes, edges, home


def _numel(node) -> int:
    val = node.meta.get("val")
    try:
        return math.prod(int(s) for s in val.shape)
    except (AttributeError, TypeError, ValueError):
        return 0


def si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


# --- layout: inputs and shared on top, decoder layers in a snaking grid, head side below --------------------


def _rows(keys: list[str], edges: Counter) -> list[list[str]]:
    """Layered layout of `keys` (in first-appearance order): a box sits one row below its latest input."""
    rank: dict[str, int] = {}
    for k in keys:
        rank[k] = 1 + max((rank[a] for (a, b) in edges if b == k and a in rank), default=-1)
    rows: list[list[str]] = [[] for _ in range(max(rank.values(), default=-1) + 1)]
    for k in keys:
        rows[rank[k]].append(k)
    return rows


def layout(boxes: dict[str, Box], edges: Counter):
    """Top-left corner of every box, the layer block's frame (or None) and the canvas size."""
    layers = sorted((b for b in boxes.values() if b.part == "layer"), key=lambda b: b.layer_index)
    others = [k for k, b in boxes.items() if b.part != "layer"]
    feeds = {b.key for b in layers}  # boxes upstream of a layer box go on top
    changed = True
    while changed:
        changed = False
        for a, b in edges:
            if b in feeds and a not in feeds:
                feeds.add(a)
                changed = True
    top = _rows([k for k in others if k in feeds], edges)
    bottom = _rows([k for k in others if k not in feeds], edges)
    cols = min(GRID_COLS, len(layers)) or 1
    width = max([cols] + [len(r) for r in top + bottom]) * (BW + GX) - GX + 2 * MARGIN + 2 * 70  # 70: side routes
    center = width / 2
    pos: dict[str, tuple[float, float]] = {}
    y = TOP

    def place(rows, y):
        for row in rows:
            x = center - (len(row) * (BW + GX) - GX) / 2
            for i, k in enumerate(row):
                pos[k] = (x + i * (BW + GX), y)
            y += BH + GY
        return y

    y = place(top, y)
    frame = None
    if layers:
        y += 14  # room for the frame's label
        x0 = center - (cols * (BW + GX) - GX) / 2
        for i, b in enumerate(layers):
            r, c = divmod(i, cols)
            c = c if r % 2 == 0 else cols - 1 - c  # snake: consecutive layers are always neighbours
            pos[b.key] = (x0 + c * (BW + GX), y + r * (BH + GY))
        rows = math.ceil(len(layers) / cols)
        frame = (x0 - 10, y - 10, cols * (BW + GX) - GX + 20, rows * (BH + GY) - GY + 20)
        y += rows * (BH + GY) + 10
    y = place(bottom, y)
    return pos, frame, (width, y + MARGIN - GY)
