"""Device profiles: the rates of one GPU and its links, each figure tagged measured or assumed.

A profile is JSON in lcgraph/planner/profiles/ (or any path); `tools/profile_device.py` writes one on a GPU.
Kernel rates follow one FLOP convention so that a rate times seconds gives the cost model's FLOPs back:

    matmul [m, k] x [k, n]        forward 2*m*k*n; backward (dX and dW) 4*m*k*n
    attention diagonal block      forward 4 * heads * head_dim * s*(s+1)/2 (square, causal)
    attention prefix block        forward 4 * heads * head_dim * sq*sk (sq queries over sk earlier keys, no mask)
    attention backward            2.5 x its forward FLOPs (dQ, dK, dV and the scores again)
    fused LM head + loss          6*h*V per token with gradients, 2*h*V without (forward under no_grad)

`provenance` maps a figure's name to "measured: how" or "assumed: the public source"; a figure the map
does not name is assumed, with the profile's `source` as its reference. Plans print the figures they
used in these two groups (`DeviceProfile.status`). The datasheet peaks (`peak_bf16_flops`, `peak_fp32_flops`,
with `peak_source`) are no rate of the time model: they are what MFU divides by (lcgraph.planner.mfu).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lcgraph.errors import ProfileError

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
ATTENTION_BACKWARD = 2.5  # attention backward FLOPs per forward FLOP (the convention above)


def interp_log(points: Sequence[tuple[float, float]], x: float) -> float:
    """y at x, linear in log2(x) between sorted (x, y) points, clamped at the ends."""
    lx = math.log2(max(x, 1.0))
    if lx <= math.log2(points[0][0]):
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        l0, l1 = math.log2(x0), math.log2(x1)
        if lx <= l1:
            return y0 + (y1 - y0) * (lx - l0) / (l1 - l0)
    return points[-1][1]


LINK_KINDS = ("p2p", "all_to_all")  # links with a figure of their own (fitted by lcgraph-check)


@dataclass
class DeviceProfile:
    """Rates of one GPU and its links. Units: bytes, FLOP/s, bytes/s."""

    name: str
    memory_bytes: float
    matmul_flops: float  # dense bf16 matmul as measured (the time model's rate; never the MFU denominator)
    attention_flops: dict[int, list[tuple[int, float]]]  # head dim -> [(seq_len, fwd+bwd FLOP/s)], causal
    memory_bandwidth: float
    intra_node_bw: float  # per GPU, NCCL bus bandwidth inside a node (NVLink)
    inter_node_bw: float  # per GPU, NCCL bus bandwidth across nodes (InfiniBand)
    gpus_per_node: int = 8
    p2p_bw: float = 0.0  # inside a node, one pipeline send/receive between two GPUs, bytes/s (0: intra_node_bw)
    all_to_all_bw: float = 0.0  # inside a node, Ulysses all-to-all: bytes each rank sends to others / s (0: ditto)
    fp32_flops: float = 0.0  # fp32 (no tensor cores): used for train.dtype=fp32 plans
    fp8_speedup: float = 0.0  # FP8 over bf16 matmul rate at the same shape (train.fp8); 0: no FP8 tensor cores
    # [k, n, forward FLOP/s, backward FLOP/s] of [tokens, k] x [k, n] at long token counts
    matmul_shapes: list[list[float]] = field(default_factory=list)
    # head dim -> {"diag": [[s, fwd, bwd]], "prefix": [[sq, sk, fwd, bwd]]} (FLOP/s, convention above)
    attention_blocks: dict[int, dict[str, list[list[float]]]] = field(default_factory=dict)
    fused_loss_flops: float = 0.0  # lcgraph's fused LM head + cross-entropy with gradients (6hV/token)
    fused_loss_nograd_flops: float = 0.0  # the same under no_grad (2hV/token)
    peak_bf16_flops: float = 0.0  # datasheet dense bf16 peak: the MFU denominator (lcgraph.planner.mfu); 0: unknown
    peak_fp32_flops: float = 0.0  # datasheet fp32 peak (no tensor cores), the denominator of fp32 runs
    peak_source: str = ""  # where the two peaks come from
    adamw_params_per_s: float = 0.0  # fused AdamW over fp32 master weights and moments
    host_bandwidth: float = 0.0  # pinned host <-> GPU copies, per direction (train.offload; lcgraph-check measures it)
    traffic_factor: dict[str, float] = field(default_factory=lambda: {"eager": 1.9, "compiled": 1.0})
    saved_factor: dict[str, float] = field(default_factory=lambda: {"eager": 1.0, "compiled": 1.0})
    provenance: dict[str, str] = field(default_factory=dict)
    description: str = ""
    source: str = ""

    @classmethod
    def from_dict(cls, data: dict) -> DeviceProfile:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"device profile {data.get('name')!r}: unknown keys {unknown}; known: {sorted(known)}")
        data = dict(data)
        data["attention_flops"] = {
            int(d): sorted((int(s), float(r)) for s, r in table) for d, table in data["attention_flops"].items()
        }
        data["attention_blocks"] = {
            int(d): {kind: sorted(rows) for kind, rows in blocks.items()}
            for d, blocks in data.get("attention_blocks", {}).items()
        }
        return cls(**data)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["attention_flops"] = {str(d): [list(p) for p in table] for d, table in self.attention_flops.items()}
        out["attention_blocks"] = {str(d): blocks for d, blocks in self.attention_blocks.items()}
        return out

    # --- honesty ---------------------------------------------------------------------------------------------
    def status(self, figure: str) -> tuple[str, str]:
        """("measured" | "assumed", where it comes from) of one figure of this profile."""
        text = self.provenance.get(figure, f"assumed: {self.source or 'no source given'}")
        kind, _, how = text.partition(":")
        return ("measured" if kind.strip() == "measured" else "assumed"), how.strip()

    # --- rates ---------------------------------------------------------------------------------------------
    def matmul_rate(self, dtype: str, k: int = 0, n: int = 0, backward: bool = False, fp8: bool = False) -> float:
        """FLOP/s of [tokens, k] x [k, n]: the measured shape nearest in log2(k), log2(n), else the peak;
        `fp8`: its FP8 matmuls' (train.fp8), the bf16 rate times `fp8_speedup`."""
        if fp8:
            return self.matmul_rate("bf16", k, n, backward) * self.fp8_speedup
        if dtype == "fp32" and self.fp32_flops:
            return self.fp32_flops
        if not (self.matmul_shapes and k and n):
            return self.matmul_flops
        row = min(self.matmul_shapes, key=lambda r: abs(math.log2(r[0] / k)) + abs(math.log2(r[1] / n)))
        return row[3] if backward else row[2]

    def attention_rate(self, seq_len: float, head_dim: int, dtype: str = "bf16") -> float:
        """Causal fwd+bwd FLOP/s for `seq_len` queries (the legacy table): nearest head dim, linear in log2."""
        if dtype == "fp32" and self.fp32_flops:
            return self.fp32_flops
        return interp_log(self.attention_flops[_nearest(self.attention_flops, head_dim)], seq_len)

    def block_rate(self, kind: str, sq: int, sk: int, head_dim: int, backward: bool, dtype: str = "bf16") -> float:
        """FLOP/s of one attention block: kind "diag" (square causal, sq == sk) or "prefix" (sq over sk keys).

        Measured tables interpolate linearly in log2 of the lengths (bilinear for prefix blocks); a
        profile without them falls back to the legacy causal rate at sq queries for both directions."""
        if dtype == "fp32" and self.fp32_flops:
            return self.fp32_flops
        if not self.attention_blocks:
            return self.attention_rate(sq, head_dim, dtype)
        rows = self.attention_blocks[_nearest(self.attention_blocks, head_dim)][kind]
        col = 2 if backward else 1
        if kind == "diag":
            return interp_log([(r[0], r[col]) for r in rows], sq)
        col += 1
        keys = sorted({r[1] for r in rows})
        per_key = [(s, interp_log([(r[0], r[col]) for r in rows if r[1] == s], sq)) for s in keys]
        return interp_log(per_key, sk)

    def link_bw(self, ranks: int, kind: str = "") -> float:
        """Bus bandwidth per GPU of a collective over `ranks` consecutive ranks (inside a node or across);
        `kind` p2p or all_to_all reads its own measured figure inside a node when the profile has one."""
        return float(getattr(self, self.link_figure(ranks, kind)))

    def link_figure(self, ranks: int, kind: str = "") -> str:
        """The profile figure `link_bw` reads (for the plan's measured / assumed lines)."""
        if ranks > self.gpus_per_node:
            return "inter_node_bw"
        return f"{kind}_bw" if kind in LINK_KINDS and getattr(self, f"{kind}_bw") else "intra_node_bw"


def _nearest(tables: dict, head_dim: int) -> int:
    return min(tables, key=lambda d: (abs(math.log2(d / head_dim)), -d))


def profile_json(data, indent: str = "") -> str:
    """A profile as JSON text: indented, floats to 4 significant digits, lists of numbers on one line."""
    inner = indent + "  "
    if isinstance(data, dict):
        items = [f"{inner}{json.dumps(str(k))}: {profile_json(v, inner)}" for k, v in data.items()]
        text = "{\n" + ",\n".join(items) + f"\n{indent}}}" if items else "{}"
    elif isinstance(data, list) and all(isinstance(x, (int, float)) for x in data):
        text = "[" + ", ".join(profile_json(x) for x in data) + "]"
    elif isinstance(data, list):
        text = "[\n" + ",\n".join(inner + profile_json(x, inner) for x in data) + f"\n{indent}]" if data else "[]"
    elif isinstance(data, float):
        text = format(data, ".4g")
    else:
        text = json.dumps(data)
    return text + ("\n" if not indent and isinstance(data, dict) else "")


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def load_profile(name_or_path: str) -> DeviceProfile:
    """A shipped profile by name (h100, h200, a100) or any profile JSON by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ProfileError(
            f"device profile {name_or_path!r} not found; shipped profiles: "
            f"{', '.join(profile_names())}, or give the path of a JSON file "
            "(tools/profile_device.py writes one)"
        )
    return DeviceProfile.from_dict(json.loads(path.read_text()))
