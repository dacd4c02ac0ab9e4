"""Tiny random checkpoints of every supported HF architecture, built offline with transformers' own
classes, and the Hugging Face greedy oracle on them (a helper module for test_model_families).

``make_checkpoint(family, directory)`` writes a complete HF folder: ``config.json``, safetensors
(one file, or shards with ``model.safetensors.index.json`` when ``sharded``), ``generation_config.json``
with the EOS ids, and a byte-level BPE tokenizer (ASCII only, built in code: nothing is downloaded)
with a chat template. The weights are random but not trivial: every norm weight is randomised,
attention biases are non-zero, and the LM head is scaled so greedy decoding has clear margins
(``hf_greedy`` reports the smallest top-1 / top-2 gap so a test can insist on it).
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3", "mixtral", "qwen3_moe")
SLIDING_WINDOW = 12          # mistral / gemma3: prompts of ~40 tokens are 3x the window
MIN_MARGIN = 5e-3            # top-1 minus top-2 logit at every greedy step (float32 noise ~1e-5)

# tokenizer: special tokens first, then the printable ASCII bytes, then a few merges
SPECIALS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
UNK_ID, BOS_ID, EOS_ID, USER_ID, ASSISTANT_ID, END_ID = range(len(SPECIALS))
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{% else %}<|assistant|>{% endif %}"
    "{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
_MERGE_WORDS = ["the", "and", "ing", "ion", "er", "in", "on", "at", "en", "re", "es", "st", " t", " a", " s",
                " th", " the", " o", " w", " c"]

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
               bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=UNK_ID)


def _family_config(family: str, vocab_size: int, overrides: dict[str, Any]):
    import transformers as T

    c = dict(_COMMON, vocab_size=vocab_size)
    if family == "llama":
        cls = T.LlamaConfig
        c.update(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    elif family == "qwen2":
        cls = T.Qwen2Config               # q/k/v biases always on; tied embeddings
        c.update(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    elif family == "qwen3":
        cls = T.Qwen3Config               # q/k RMSNorm per head
        c.update(tie_word_embeddings=False, head_dim=32,      # head_dim != hidden / heads
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    elif family == "mistral":
        cls = T.MistralConfig
        c.update(tie_word_embeddings=False, sliding_window=SLIDING_WINDOW,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    elif family == "gemma3":
        cls = T.Gemma3TextConfig          # (1 + w) norms, 4 norms per layer, sqrt(D) embedding scale, GELU
        c.update(num_hidden_layers=3, head_dim=24, query_pre_attn_scalar=32,   # scale 32^-0.5, not 24^-0.5
                 hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                 sliding_window=SLIDING_WINDOW,
                 layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                 rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                  "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
                 attn_logit_softcapping=None, final_logit_softcapping=None)
    elif family == "phi3":
        cls = T.Phi3Config                # fused qkv_proj and gate_up_proj
        c.update(tie_word_embeddings=False, original_max_position_embeddings=512, sliding_window=None,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0})
        c.pop("head_dim")                 # phi3 derives it: 64 / 4 = 16
    elif family == "mixtral":
        cls = T.MixtralConfig
        c.update(tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2, intermediate_size=96,
                 sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    elif family == "qwen3_moe":
        cls = T.Qwen3MoeConfig
        c.update(tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                 norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], head_dim=32,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    c.update(overrides)
    return cls(**c)


# ------------------------------------------------------------------------------------- tokenizer

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the one the ByteLevel pre-tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer():
    """A byte-level BPE tokenizer over printable ASCII (and newline) with a few merges, BOS
    prepended by the post-processor, and the chat template above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    chars = [b2u[b] for b in [10, *range(32, 127)]]
    assert set(chars) <= set(ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    merges = []

    def enc(s: str) -> str:
        return "".join(b2u[b] for b in s.encode())

    for word in _MERGE_WORDS:                    # left-to-right merges building each word
        w = enc(word)
        cur = w[0]
        for ch in w[1:]:
            pair = (cur, ch)
            if pair not in merges:
                merges.append(pair)
            cur = cur + ch
            vocab.setdefault(cur, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS_ID)])
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>", additional_special_tokens=SPECIALS[3:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def vocab_size() -> int:
    return len(build_tokenizer())


# ------------------------------------------------------------------------------------ checkpoint

def _randomise(model, family: str, seed: int, head_scale: float) -> None:
    """Non-trivial norms and biases, a peaked LM head; everything from ``seed``.

    The logits are sharpened by ``head_scale``: on the LM head where it is its own matrix, on the
    final norm where the head is tied to the embedding (a scaled embedding would dominate the
    residual stream and the model would repeat its input token)."""
    g = torch.Generator().manual_seed(seed)
    gemma = family == "gemma3"           # Gemma's norms scale by (1 + w), the others by w
    tied = model.config.tie_word_embeddings
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
                if tied and name == "model.norm.weight":
                    p.mul_(head_scale)
                if gemma:
                    p.sub_(1.0)
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:      # Gemma multiplies it by sqrt(D): keep it from dominating
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** (-1.0 if gemma else -0.5))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5))   # [out, in]: 1/sqrt(in)
        if not tied:
            model.get_output_embeddings().weight.mul_(head_scale / 8)


def make_checkpoint(family: str, directory, *, dtype: torch.dtype = torch.float32, sharded: bool = False,
                    seed: int = 0, head_scale: float = 16.0, **config_overrides) -> str:
    """Write a tiny random ``family`` checkpoint into ``directory`` (created); returns its path.

    ``config_overrides`` go into the transformers config (e.g. ``mlp_bias=True``). Two of them are
    written into config.json as given, after saving, instead: ``architectures=[...]``, and
    ``config_json={...}`` (raw fields, e.g. a legacy top-level one transformers would move)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    tokenizer = build_tokenizer()
    raw = dict(config_overrides.pop("config_json", None) or {})
    if "architectures" in config_overrides:
        raw["architectures"] = config_overrides.pop("architectures")
    config = _family_config(family, len(tokenizer), config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise(model, family, seed, head_scale)
    model = model.to(dtype).eval()
    kw = {"max_shard_size": "100KB"} if sharded else {}
    model.save_pretrained(directory, safe_serialization=True, **kw)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=[EOS_ID, END_ID], pad_token_id=UNK_ID,
                     do_sample=False).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if raw:
        path = os.path.join(directory, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg.update(raw)
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
    return directory


# ----------------------------------------------------------------------------------------- oracle

def load_hf(directory, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, local_files_only=True).eval()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, *, use_eos: bool = True) -> tuple[list[int], float]:
    """HF greedy continuation of one unpadded prompt, and the smallest top-1 - top-2 logit gap over
    its steps. ``use_eos``: stop at the generation config's EOS ids (as the engine does); else never."""
    ids = torch.tensor([prompt_ids])
    kw = {} if use_eos else {"eos_token_id": []}
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=UNK_ID, **kw)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    margin = min((l[0].float().topk(2).values.diff().abs().item() for l in out.logits), default=float("inf"))
    return tokens, margin
