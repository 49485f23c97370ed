"""Document masks: attention that stays inside each packed document (`data.cross_document_attention=false`).

The runtime sets the running micro-batch's document ids (`set_documents`: [B, S], the whole window, before
any chunking or sharding) around each forward and backward; the attention op reads them through
`document_mask`. One rule serves every layout: the keys an attention call sees always start at the window's
first token (a whole sequence; a Seq1F1B chunk after its relayed prefix; a Ulysses rank after the all-to-all,
which gathers the chunk whole), so keys are positions 0 .. Sk and queries the last Sq of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_documents: torch.Tensor | None = None  # [B, S] document id of each position of the running micro-batch


def set_documents(document_ids: torch.Tensor | None) -> None:
    """Mask attention by these document ids from now on (None: no document mask)."""
    global _documents
    _documents = document_ids


def document_mask(sq: int, sk: int, device: torch.device) -> torch.Tensor | None:
    """[B, 1, Sq, Sk] bool, True where query i may see key j: causal (bottom-right) and the same document.

    None when no document ids are set (plain causal attention).
    """
    if _documents is None:
        return None
    docs = _documents.to(device)
    if docs.shape[1] < sk:
        raise RuntimeError(f"document mask: {sk} keys but the window holds {docs.shape[1]} positions")
    keys, queries = docs[:, :sk], docs[:, sk - sq : sk]
    causal = torch.arange(sk, device=device)[None, :] <= torch.arange(sk - sq, sk, device=device)[:, None]
    return ((queries[:, :, None] == keys[:, None, :]) & causal).unsqueeze(1)


def masked_attention(q, k, v, scale: float, mask: torch.Tensor, backend: str) -> torch.Tensor:
    """Attention under an explicit boolean mask: exact fp32 math on CPU, SDPA (which takes a mask) on GPU."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if backend == "math":
        acc = torch.promote_types(q.dtype, torch.float32)
        scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(scores.softmax(-1), v.to(acc)).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
