"""Reference paged attention in plain torch (CPU and GPU): the oracle for every other backend.

Decode rows (one new token) of a step are attended in one batched, masked SDPA call over K/V
gathered by block table into a padded batch. Rows of sequences with several new tokens (prefills,
prefill chunks) are attended one sequence at a time, each over exactly its own context.
Per-step index tensors are built on the first layer and cached in ``meta.scratch``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from services.executor.attention import AttentionBackend, AttentionMetadata


def _tile_rows(block_ids: Tensor, num_kv_heads: int) -> Tensor:
    """block_ids [..., nb] -> rows [..., Hkv, nb] of the (block, kv head) tiles in
    cache.view(N * Hkv, bs, D), ordered so a gather gives [..., Hkv, nb*bs, D] directly."""
    heads = torch.arange(num_kv_heads, device=block_ids.device)
    return block_ids.unsqueeze(-2) * num_kv_heads + heads[:, None]


def _gather_kv(cache: Tensor, rows: Tensor, out: Tensor | None = None) -> Tensor:
    """cache [N, Hkv, bs, D], rows [..., Hkv, nb] (from _tile_rows) -> [..., Hkv, nb*bs, D].

    One index_select over (block, head) tiles seen as rows of bs*D elements (the 2-D form is
    the fast path on CPU); ``out`` [R, bs*D] reuses a buffer across layers."""
    n, hkv, bs, d = cache.shape
    g = torch.index_select(cache.view(n * hkv, bs * d), 0, rows.reshape(-1), out=out)
    return g.view(*rows.shape[:-1], rows.shape[-1] * bs, d)


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean mask -> additive float mask (0 / -inf), built once per step instead of per layer."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


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
    def _plan(self, meta: AttentionMetadata, block_size: int, num_kv_heads: int,
              device: torch.device, dtype: torch.dtype) -> dict:
        plan = meta.scratch.get("torch_ref")
        if plan is not None:
            return plan
        q_lens, ctx_lens = meta.host_lens()
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        dec = [b for b in range(meta.num_seqs) if q_lens[b] == 1]
        plan = {"decode": None, "prefill": []}
        if dec:
            max_ctx = max(ctx_lens[b] for b in dec)
            nb = -(-max_ctx // block_size)
            if len(dec) == meta.num_seqs:
                rows = None                                 # all rows, in order
                tables = meta.block_tables[:, :nb]
                ctx = meta.context_lens
            else:
                idx = torch.tensor(dec, dtype=torch.long).to(device, non_blocking=True)
                rows = meta.cu_seqlens_q.long()[idx]
                tables = meta.block_tables[idx, :nb]
                ctx = meta.context_lens[idx]
            key_pos = torch.arange(nb * block_size, device=device)
            mask = _additive((key_pos[None, :] < ctx[:, None].long())[:, None, None, :], dtype)  # [S,1,1,L]
            plan["decode"] = (rows, _tile_rows(tables.long(), num_kv_heads), mask)
        for b in range(meta.num_seqs):
            n, c = q_lens[b], ctx_lens[b]
            if n <= 1:
                continue
            nb = -(-c // block_size)
            tables = _tile_rows(meta.block_tables[b, :nb].long(), num_kv_heads)
            if c == n:
                mask = None                                  # no cached prefix: plain causal
            else:                                            # query i sits at position c - n + i
                q_pos = torch.arange(c - n, c, device=device)
                mask = _additive(torch.arange(c, device=device)[None, :] <= q_pos[:, None], dtype)  # [n, c]
            plan["prefill"].append((cu[b], cu[b + 1], c, tables, mask))
        meta.scratch["torch_ref"] = plan
        return plan

    def attend(self, query: Tensor, kv: Tensor, meta: AttentionMetadata, scale: float) -> Tensor:
        # query [T, Hq, D]; kv [2, N, Hkv, bs, D]
        T, hq, d = query.shape
        hkv, bs = kv.shape[2], kv.shape[3]
        group = hq // hkv
        plan = self._plan(meta, bs, hkv, query.device, kv.dtype)
        out = torch.empty_like(query)
        k_cache, v_cache = kv[0], kv[1]

        if plan["decode"] is not None:
            rows, tables, mask = plan["decode"]
            q = query if rows is None else query[rows]                  # [S, Hq, D]
            s = q.shape[0]
            q = q.view(s, hkv, group, d).to(kv.dtype)                   # [S, Hkv, G, D]
            bufs = plan.get("decode_bufs")
            if bufs is None:                                            # shared by every layer
                bufs = plan["decode_bufs"] = tuple(
                    torch.empty(tables.numel(), bs * d, dtype=kv.dtype, device=kv.device) for _ in range(2))
            k = _gather_kv(k_cache, tables, bufs[0])                    # [S, Hkv, L, D]
            v = _gather_kv(v_cache, tables, bufs[1])
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            o = o.reshape(s, hq, d).to(query.dtype)                     # [S, Hq, D]
            if rows is None:
                out = o
            else:
                out[rows] = o

        for start, end, c, tables, mask in plan["prefill"]:
            n = end - start
            q = query[start:end].transpose(0, 1).to(kv.dtype)           # [Hq, n, D]
            k = _gather_kv(k_cache, tables)[:, :c]                      # [Hkv, c, D]
            v = _gather_kv(v_cache, tables)[:, :c]
            if group > 1:
                k = k[:, None].expand(hkv, group, c, d).reshape(hq, c, d)
                v = v[:, None].expand(hkv, group, c, d).reshape(hq, c, d)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               scale=scale)            # [Hq, n, D]
            out[start:end] = o.transpose(0, 1).to(query.dtype)
        return out
