"""Reference paged attention in plain torch (CPU and GPU): the oracle for every other backend.

Decode rows (one new token) of a step are attended in one batched, masked SDPA call over K/V
gathered by block table into a padded batch. Rows of sequences with several new tokens (prefills,
prefill chunks) are attended in padded groups too: one gather and one masked SDPA per group of
similar sizes (``group_prefills``), with the KV-head sharing of GQA left to SDPA (``enable_gqa``).
Per-step index tensors and masks are built on the first layer and cached in ``meta.scratch``;
they are built from per-sequence lists only, with no device sync.

Sliding windows (``attend(..., window=W)``, W > 0): the gathers are the same as for full attention,
only the masks differ (a query at position p sees keys p - W < k <= p). The plan holds the
window-independent part; each window's masks are built by the first layer that uses that window and
kept beside the full-attention ones, so layers with different windows share one plan per step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from services.executor.attention.base import AttentionBackend, AttentionMetadata, check_window

# A prefill group is padded to (sequences x longest query x longest context); a sequence joins the
# current group while that padded area stays within this factor of the area the group really needs.
PREFILL_PAD_LIMIT = 4.0


def _tile_rows(block_ids: Tensor, num_kv_heads: int) -> Tensor:
    """block_ids [..., nb] -> rows [..., Hkv, nb] of the (block, kv head) tiles in
    cache.view(N * Hkv, bs, D), ordered so a gather gives [..., Hkv, nb*bs, D] directly."""
    heads = torch.arange(num_kv_heads, device=block_ids.device)
    return block_ids.unsqueeze(-2) * num_kv_heads + heads[:, None]


def _kv_rows(block_tables: Tensor, num_blocks: int, num_kv_heads: int) -> Tensor:
    """block_tables [S, nb] -> rows [2 * S*Hkv*nb] of kv.view(2 * N * Hkv, bs*D): the K tiles of
    every (seq, kv head, block), then the same V tiles (the V plane starts N * Hkv rows later)."""
    rows = _tile_rows(block_tables.long(), num_kv_heads).reshape(-1)
    return torch.cat((rows, rows + num_blocks * num_kv_heads))


def _gather_kv(kv: Tensor, rows: Tensor, shape: tuple[int, int, int], out: Optional[Tensor] = None
               ) -> tuple[Tensor, Tensor]:
    """kv [2, N, Hkv, bs, D], rows from ``_kv_rows`` -> (K, V), each [S, Hkv, nb*bs, D].

    One index_select for K and V together over (block, head) tiles seen as rows of bs*D elements
    (the 2-D form is the fast path on CPU); ``out`` [2 * S*Hkv*nb, bs*D] reuses a buffer across layers."""
    _, n, hkv, bs, d = kv.shape
    g = torch.index_select(kv.view(2 * n * hkv, bs * d), 0, rows, out=out)
    k, v = g.view(2, *shape, bs * d).unbind(0)
    s, h, nb = shape
    return k.view(s, h, nb * bs, d), v.view(s, h, nb * bs, d)


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean mask -> additive float mask (0 / -inf), built once per step instead of per layer."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def group_prefills(seqs: list[int], q_lens: list[int], ctx_lens: list[int], block_size: int,
                   pad_limit: float = PREFILL_PAD_LIMIT) -> list[list[int]]:
    """Split the multi-token sequences of a step into groups attended by one padded SDPA each.

    Greedy over the sequences by decreasing query length: a sequence joins the open group while
    ``len(group) * max query * max padded context <= pad_limit * sum(query * context)``, so a long
    prefill chunk is not padded against many short prompts (or the other way round)."""
    groups: list[list[int]] = []
    for b in sorted(seqs, key=lambda b: (-q_lens[b], -ctx_lens[b], b)):
        if groups:
            group = groups[-1] + [b]
            n_max = max(q_lens[i] for i in group)
            c_max = -(-max(ctx_lens[i] for i in group) // block_size) * block_size
            useful = sum(q_lens[i] * ctx_lens[i] for i in group)
            if len(group) * n_max * c_max <= pad_limit * useful:
                groups[-1] = group
                continue
        groups.append([b])
    return groups


@dataclass
class _DecodePlan:
    rows: Optional[Tensor]          # [S] token rows of the decode seqs (None: every row, in order)
    tables: Tensor                  # [S, nb] int32 contiguous, their block tables
    ctx: Tensor                     # [S] int32 contiguous, their context lengths
    # the gather path's, built on the first layer that takes it (a kernel backend never does)
    kv_rows: Optional[Tensor] = None    # [2 * S*Hkv*nb] from _kv_rows
    mask: Optional[Tensor] = None       # [S, 1, 1, nb*bs] additive
    buf: Optional[Tensor] = None        # gather output, shared by every layer
    windowed: dict[int, Tensor] = field(default_factory=dict)   # window -> [S, 1, 1, nb*bs] additive


@dataclass
class _PrefillPlan:
    """One padded group of P sequences with up to n_max new tokens each."""
    q_rows: Tensor                  # [P * n_max] token row of each padded query (padding repeats a real row)
    dst: Tensor                     # [Tg] token rows of the group's real queries
    src: Tensor                     # [Tg] their positions in the padded [P * n_max] order
    kv_rows: Tensor                 # [2 * P*Hkv*nb]
    shape: tuple[int, int, int]     # (P, Hkv, nb)
    n_max: int
    mask: Optional[Tensor]          # [P, 1, n_max, nb*bs] additive: query i of seq p sees keys <= c_p - n_p + i;
                                    # None: one sequence without cached prefix, plain causal
    q_pos: Tensor                   # [P, n_max] position of each padded query (padding repeats the last real one)
    windowed: dict[int, Tensor] = field(default_factory=dict)   # window -> [P, 1, n_max, nb*bs] additive


class TorchBackend(AttentionBackend):
    name = "torch"

    # ------------------------------------------------------------------ cache writes
    def write_kv(self, kv: Tensor, key: Tensor, value: Tensor, meta: AttentionMetadata) -> None:
        # kv [2, N, Hkv, bs, D]; key, value [T, Hkv, D]
        _, _, hkv, bs, d = kv.shape
        plan = meta.scratch.get("torch_ref_write")
        if plan is None:
            slots = meta.slot_mapping
            keep = None
            if not meta.slots_all_valid:
                keep = slots >= 0
                slots = slots[keep]
            # row of (token t, head h) in kv[i].view(-1, D): (block * Hkv + h) * bs + offset
            heads = torch.arange(hkv, device=slots.device) * bs
            rows = ((slots // bs) * (hkv * bs) + slots % bs)[:, None] + heads[None, :]   # [T', Hkv]
            plan = meta.scratch["torch_ref_write"] = (keep, rows.reshape(-1))
        keep, rows = plan
        if keep is not None:
            key, value = key[keep], value[keep]
        kv[0].view(-1, d).index_copy_(0, rows, key.reshape(-1, d).to(kv.dtype))
        kv[1].view(-1, d).index_copy_(0, rows, value.reshape(-1, d).to(kv.dtype))

    def copy_blocks(self, caches: list[Tensor], pairs: Tensor) -> None:
        if pairs.numel() == 0:
            return
        src, dst = pairs[:, 0], pairs[:, 1]
        for kv in caches:                                  # kv [2, N, Hkv, bs, D]
            kv[:, dst] = kv[:, src]

    # ------------------------------------------------------------------ attention
    def _plan(self, meta: AttentionMetadata, kv: Tensor) -> dict:
        plan = meta.scratch.get("torch_ref")
        if plan is not None:
            return plan
        _, num_blocks, hkv, bs, _ = kv.shape
        device = kv.device
        q_lens, ctx_lens = meta.host_lens()
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        dec = [b for b in range(meta.num_seqs) if q_lens[b] == 1]
        plan = {"decode": None, "prefill": [], "max_ctx": max(ctx_lens, default=0)}
        if dec:
            nb = -(-max(ctx_lens[b] for b in dec) // bs)
            if len(dec) == meta.num_seqs:
                rows = None                                 # all rows, in order
                tables = meta.block_tables[:, :nb]
                ctx = meta.context_lens
            else:
                idx = torch.tensor(dec, dtype=torch.long).to(device, non_blocking=True)
                rows = meta.cu_seqlens_q.long()[idx]
                tables = meta.block_tables[idx, :nb]
                ctx = meta.context_lens[idx]
            plan["decode"] = _DecodePlan(rows, tables.to(torch.int32).contiguous(), ctx.to(torch.int32).contiguous())
        multi = [b for b in range(meta.num_seqs) if q_lens[b] > 1]
        for group in group_prefills(multi, q_lens, ctx_lens, bs):
            plan["prefill"].append(self._prefill_plan(meta, group, q_lens, ctx_lens, cu, num_blocks, kv))
        meta.scratch["torch_ref"] = plan
        return plan

    @staticmethod
    def _prefill_plan(meta: AttentionMetadata, group: list[int], q_lens: list[int], ctx_lens: list[int],
                      cu: list[int], num_blocks: int, kv: Tensor) -> _PrefillPlan:
        _, _, hkv, bs, _ = kv.shape
        device = kv.device
        P = len(group)
        n_max = max(q_lens[b] for b in group)
        nb = -(-max(ctx_lens[b] for b in group) // bs)
        host = torch.tensor([[q_lens[b], ctx_lens[b], cu[b], b] for b in group], dtype=torch.long)
        n, c, start, seq = host.to(device, non_blocking=True).unbind(1)          # [P] each
        i = torch.arange(n_max, device=device)
        last = torch.minimum(i[None, :], n[:, None] - 1)                          # [P, n_max]
        q_rows = start[:, None] + last                                           # [P, n_max]
        q_pos = (c - n)[:, None] + last                                          # [P, n_max]
        # the group's real queries, seq by seq: padded position src -> token row dst (no sync)
        total = sum(q_lens[b] for b in group)
        seg = torch.repeat_interleave(torch.arange(P, device=device), n, output_size=total)   # [Tg]
        offset = torch.arange(total, device=device) - (n.cumsum(0) - n)[seg]                  # [Tg]
        dst, src = start[seg] + offset, seg * n_max + offset
        mask = None
        if P > 1 or q_lens[group[0]] != ctx_lens[group[0]]:
            allowed = torch.arange(nb * bs, device=device)[None, None, :] <= q_pos[:, :, None]   # [P, n_max, L]
            mask = _additive(allowed[:, None], kv.dtype)
        tables = meta.block_tables[seq, :nb]
        return _PrefillPlan(q_rows.reshape(-1), dst, src, _kv_rows(tables, num_blocks, hkv), (P, hkv, nb),
                            n_max, mask, q_pos)

    @staticmethod
    def _prefill_window_mask(pre: _PrefillPlan, window: int, kv: Tensor) -> Tensor:
        """The group's mask for a sliding window (built once per step and window)."""
        mask = pre.windowed.get(window)
        if mask is None:
            key_pos = torch.arange(pre.shape[2] * kv.shape[3], device=kv.device)[None, None, :]   # [1, 1, L]
            q_pos = pre.q_pos[:, :, None]                                                     # [P, n_max, 1]
            allowed = (key_pos <= q_pos) & (key_pos > q_pos - window)                        # [P, n_max, L]
            mask = pre.windowed[window] = _additive(allowed[:, None], kv.dtype)
        return mask

    def attend(self, query: Tensor, kv: Tensor, meta: AttentionMetadata, scale: float,
               window: int = 0) -> Tensor:
        # query [T, Hq, D]; kv [2, N, Hkv, bs, D]
        T, hq, d = query.shape
        hkv = kv.shape[2]
        group = hq // hkv
        plan = self._plan(meta, kv)
        window = check_window(window, plan["max_ctx"])
        out = torch.empty_like(query)

        dec: Optional[_DecodePlan] = plan["decode"]
        if dec is not None:
            q = query if dec.rows is None else query[dec.rows]                  # [S, Hq, D]
            o = self._attend_decode(q, kv, meta, dec, scale, window)            # [S, Hq, D]
            if dec.rows is None:
                out = o
            else:
                out[dec.rows] = o

        pre: _PrefillPlan
        for pre in plan["prefill"]:
            P = pre.shape[0]
            q = query.index_select(0, pre.q_rows).view(P, pre.n_max, hq, d).transpose(1, 2)   # [P, Hq, n, D]
            k, v = _gather_kv(kv, pre.kv_rows, pre.shape)                        # [P, Hkv, L, D] each
            mask = pre.mask if window == 0 else self._prefill_window_mask(pre, window, kv)
            o = F.scaled_dot_product_attention(q.to(kv.dtype), k, v, attn_mask=mask, scale=scale,
                                               is_causal=mask is None, enable_gqa=group > 1)  # [P, Hq, n, D]
            o = o.transpose(1, 2).reshape(P * pre.n_max, hq, d)
            out.index_copy_(0, pre.dst, o.index_select(0, pre.src).to(query.dtype))
        return out

    def _attend_decode(self, q: Tensor, kv: Tensor, meta: AttentionMetadata, dec: _DecodePlan,
                       scale: float, window: int = 0) -> Tensor:
        """The decode rows: q [S, Hq, D] -> [S, Hq, D], gathered K/V and one masked SDPA.
        The query of a decode row sits at position ctx - 1: it sees keys ctx - window <= k < ctx."""
        s, hq, d = q.shape
        _, num_blocks, hkv, bs, _ = kv.shape
        nb, dtype = dec.tables.shape[1], q.dtype
        if dec.kv_rows is None:
            dec.kv_rows = _kv_rows(dec.tables, num_blocks, hkv)
            key_pos = torch.arange(nb * bs, device=kv.device)
            dec.mask = _additive((key_pos[None, :] < dec.ctx[:, None].long())[:, None, None, :], kv.dtype)
            dec.buf = kv.new_empty(dec.kv_rows.numel(), bs * d)
        mask = dec.mask
        if window > 0:
            mask = dec.windowed.get(window)
            if mask is None:
                key_pos = torch.arange(nb * bs, device=kv.device)[None, :]      # [1, L]
                ctx = dec.ctx[:, None].long()                                   # [S, 1]
                allowed = (key_pos < ctx) & (key_pos >= ctx - window)           # [S, L]
                mask = dec.windowed[window] = _additive(allowed[:, None, None, :], kv.dtype)
        q = q.view(s, hkv, hq // hkv, d).to(kv.dtype)                          # [S, Hkv, G, D]: G as query length
        k, v = _gather_kv(kv, dec.kv_rows, (s, hkv, nb), dec.buf)               # [S, Hkv, L, D] each
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return o.reshape(s, hq, d).to(dtype)
