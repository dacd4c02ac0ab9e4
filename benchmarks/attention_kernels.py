"""Decode attention kernel bandwidth on the GPU (needs CUDA and CuPy; exits otherwise).

    python -m benchmarks.attention_kernels [--dtype fp16] [--heads 32 --kv-heads 8 --head-dim 128]

For every (batch, context) it times, with CUDA events on one stream:
  * copy       : a device-to-device copy of a large buffer, the practical bandwidth ceiling,
                 measured in the same run (bytes read + bytes written per second);
  * paged/auto : the decode kernel, shuffled block tables, the planner's single/split choice;
  * paged/1p   : forced single pass;  paged/splitK : forced split-K (+ reduce);
  * contig/auto: the same kernel with block tables that are contiguous ranges (layout effect);
  * sdpa       : torch scaled_dot_product_attention (GQA) on K/V already gathered into
                 contiguous [B, Hkv, L, D] tensors (the gather itself is not timed: the dense
                 best case), and sdpa+gather including the block-table gather.
Bandwidth = bytes of K and V the step must read (sum of context lengths x Hkv x D x 2 x elem)
divided by the time; "%copy" compares with the copy bandwidth. Rows whose KV bytes fit in twice
the L2 cache are marked "L2": their numbers include cache hits across iterations.
"""
from __future__ import annotations

import argparse
import math
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128, choices=[64, 128])
    ap.add_argument("--block-size", type=int, default=16, choices=[16, 32])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--max-kv-gib", type=float, default=16.0, help="skip configs above this")
    args = ap.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("attention_kernels: torch is not installed", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("attention_kernels: needs a CUDA GPU (torch.cuda.is_available() is False); nothing run",
              file=sys.stderr)
        return 2
    try:
        import cupy  # noqa: F401
    except ImportError:
        print("attention_kernels: needs CuPy (pip install '.[gpu]'); nothing run", file=sys.stderr)
        return 2

    import torch.nn.functional as F

    from services.executor.attention import AttentionMetadata
    from services.executor.attention import cuda as cb

    dev = torch.device("cuda")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    hq, hkv, d, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    backend = cb.CudaBackend(dev)
    scale = 1.0 / math.sqrt(d)

    def timed(fn, iters=args.iters) -> float:
        """Mean seconds per call, CUDA events on the current stream."""
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters

    # ---- copy bandwidth ceiling (1 GiB read + 1 GiB written)
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() / timed(lambda: dst.copy_(src), 10)
    del src, dst
    print(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MiB")
    print(f"device copy bandwidth (read + write): {copy_bw / 1e9:.0f} GB/s")
    print(f"decode: {args.dtype}, Hq={hq}, Hkv={hkv}, D={d}, block={bs}\n")

    hdr = f"{'batch':>5} {'ctx':>6} {'variant':<12} {'plan':<10} {'us':>9} {'GB/s':>7} {'%copy':>6}"
    print(hdr)
    print("-" * len(hdr))
    for B in args.batches:
        for L in args.contexts:
            kv_bytes = B * L * hkv * d * 2 * elem
            if kv_bytes > args.max_kv_gib * (1 << 30):
                continue
            nb = -(-L // bs)
            NB = B * nb + 1
            kv = torch.randn((2, NB, hkv, bs, d), device=dev).to(dtype)
            q = torch.randn((B, hq, d), device=dev).to(dtype)
            contig = (torch.arange(B * nb, device=dev).view(B, nb) + 1).int()
            shuffled = (torch.randperm(B * nb, device=dev).view(B, nb) + 1).int()

            def meta_for(tables):
                return AttentionMetadata(
                    num_seqs=B, slot_mapping=torch.zeros(B, dtype=torch.int64, device=dev),
                    cu_seqlens_q=torch.arange(B + 1, dtype=torch.int32, device=dev),
                    context_lens=torch.full((B,), L, dtype=torch.int32, device=dev),
                    block_tables=tables, max_seqlen_q=1, max_context_len=L, is_decode=True)

            mark = " L2" if kv_bytes < 2 * l2 else ""
            rows = []
            for name, tables, force in (("paged/auto", shuffled, None), ("paged/1p", shuffled, False),
                                        ("paged/splitK", shuffled, True), ("contig/auto", contig, None)):
                plan = cb.plan_attention(B, hq, hkv, 1, L, B, d, backend.num_sms, force_split=force)
                m = meta_for(tables)
                t = timed(lambda: backend.attend(q, kv, m, scale, plan=plan))
                label = f"split{plan.num_partitions}" if plan.split else "single"
                rows.append((name, label, t))

            # dense baseline: K/V gathered once into contiguous [B, Hkv, L, D]
            def gather(tables):
                g = kv[:, tables.long()]                          # [2, B, nb, Hkv, bs, D]
                return g.permute(0, 1, 3, 2, 4, 5).reshape(2, B, hkv, nb * bs, d)[:, :, :, :L]
            k_c, v_c = (x.contiguous() for x in gather(shuffled))
            q4 = q.view(B, hq, 1, d)
            t = timed(lambda: F.scaled_dot_product_attention(q4, k_c, v_c, scale=scale, enable_gqa=True))
            rows.append(("sdpa", "dense", t))

            def sdpa_gather():
                kg, vg = gather(shuffled)
                return F.scaled_dot_product_attention(q4, kg, vg, scale=scale, enable_gqa=True)
            rows.append(("sdpa+gather", "dense", timed(sdpa_gather)))

            for name, label, t in rows:
                bw = kv_bytes / t
                print(f"{B:>5} {L:>6} {name:<12} {label:<10} {t * 1e6:>9.1f} {bw / 1e9:>7.0f} "
                      f"{100 * bw / copy_bw:>5.0f}%{mark}")
            del kv, k_c, v_c
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
