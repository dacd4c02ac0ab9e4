"""Benchmark tools: `pagedserve bench serve` (load generator against any OpenAI-compatible server),
`pagedserve bench compare` (offline throughput vs Hugging Face, one process per system) and
`pagedserve bench sweep` (concurrency, KV memory and prefix-cache sweeps)."""
