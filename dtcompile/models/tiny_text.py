"""Tokenizers for the tiny built-in pipelines, built in code: CLIP-style byte-level BPE, T5-style Unigram and a
Mistral-style chat tokenizer (Unigram pieces plus Mistral's control tokens and a chat template).

Listed words become single tokens; any other text still tokenizes (CLIP: into bytes, T5: into characters).
Shared by every family whose built-ins need CLIP or T5 tokenizers. Importing this module loads no transformers.
"""

from __future__ import annotations

from collections import Counter
from itertools import pairwise
from typing import Any


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _clip_vocab_and_merges(
    words: tuple[str, ...] | list[str],
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary laid out like CLIP's: bytes, bytes + '</w>', merged tokens, then specials.

    The merges are learnt from ``words`` by plain BPE training (most frequent pair first, ties broken by the
    pair itself), so applying them turns every listed word into one token; merges written by hand per word
    conflict (``a t</w>`` from "at" would split "cat"). Other text still tokenizes into byte tokens.
    """
    base = _bytes_to_unicode()
    tokens = [*base, *(c + "</w>" for c in base)]
    segments = [[*w[:-1], w[-1] + "</w>"] for w in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for seg in segments for pair in pairwise(seg))
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        tokens.append(best[0] + best[1])
        segments = [_merge_pair(seg, best) for seg in segments]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _t5_vocab(words: tuple[str, ...] | list[str]) -> list[tuple[str, float]]:
    """A Unigram vocabulary laid out like T5's: <pad>, </s>, <unk>, then scored pieces.

    Whole words (``▁cat``) score higher than characters, so listed words stay one piece; printable ASCII
    characters (with and without the ``▁`` word-start marker) cover everything else.
    """
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0 - i * 1e-3) for i, w in enumerate(words)]
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    pieces += [("▁" + c, -8.0) for c in chars]
    pieces += [(c, -9.0) for c in chars]
    return pieces


def build_tiny_tokenizers(config: dict[str, Any]) -> tuple[Any, Any]:
    """CLIP and T5 tokenizers built in code (no files, no network) from a tiny pipeline's config.

    ``config`` gives ``tokenizer_words`` and the two ``tokenizer*_max_length`` values.
    """
    # transformers 5 exports T5TokenizerFast lazily (an alias of T5Tokenizer) and leaves it out of its type hints
    from transformers import CLIPTokenizer, T5TokenizerFast  # type: ignore[attr-defined]

    vocab, merges = _clip_vocab_and_merges(config["tokenizer_words"])
    # merges as (a, b) pairs: what the tokenizers BPE model takes, whatever CLIPTokenizer's hint says (str | list[str])
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=config["tokenizer_max_length"])  # type: ignore[arg-type]
    tokenizer_2 = T5TokenizerFast(
        vocab=_t5_vocab(config["tokenizer_words"]),
        extra_ids=0,
        model_max_length=config["tokenizer_2_max_length"],
    )
    return tokenizer, tokenizer_2


def build_tiny_mistral_tokenizer(words: tuple[str, ...] | list[str], max_length: int) -> Any:
    """A chat tokenizer shaped like Mistral-Small-3.1's, built in code: ``apply_chat_template`` takes the
    conversations Flux2Pipeline builds (batched, padded to ``max_length``). Listed words are single pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Mistral-Small-3.1's layout, <s>[SYSTEM_PROMPT]..[/SYSTEM_PROMPT][INST]..[/INST]; content is a string or a
    # list of {"type": "text", "text": ...} parts (what Flux2Pipeline's format_input builds). In the function so
    # the built-ins' cache key (the source of MISTRAL_TOKENIZER_CODE) covers it.
    template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% set text = m['content'] if m['content'] is string else "
        "(m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) %}"
        "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
        "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]"
        "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
    )

    control = ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]")
    specials = ("<unk>", "<s>", "</s>", "<pad>", *control)
    pieces = [(s, 0.0) for s in specials] + [p for p in _t5_vocab(words) if p[0] not in specials]
    backend = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=list(control),
        model_max_length=max_length,
    )
    tokenizer.chat_template = template
    return tokenizer


def tiny_t5(d_model: int, **overrides: Any) -> dict[str, Any]:
    """A tiny T5 v1.1-style encoder config (gated GELU, 2 layers, 4 heads; ``d_kv`` and ``d_ff`` follow from
    ``d_model``), as FLUX's T5-XXL, SD3's T5 and Wan's UMT5 are shaped; ``overrides`` replace any key."""
    return {
        "d_model": d_model,
        "d_kv": d_model // 4,
        "d_ff": 2 * d_model,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 32,
        "feed_forward_proj": "gated-gelu",
        "dropout_rate": 0.0,
        "is_encoder_decoder": False,
        "use_cache": False,
        **overrides,
    }


def text_config(config_cls: type, tokenizer: Any, **kwargs: Any) -> Any:
    """A transformers text-encoder config (``CLIPTextConfig``, ``T5Config``, ``UMT5Config``) sized and
    token-numbered for ``tokenizer``: its vocabulary size and eos/pad ids, plus its bos id (CLIP) or, for a
    T5-style tokenizer without one, the pad id as ``decoder_start_token_id``; ``kwargs`` are the model's widths."""
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if tokenizer.bos_token_id is not None:
        ids["bos_token_id"] = tokenizer.bos_token_id
    else:
        ids["decoder_start_token_id"] = tokenizer.pad_token_id
    return config_cls(vocab_size=len(tokenizer), **ids, **kwargs)


#: Functions whose source goes into a built-in's cache key (their output is part of the files).
TOKENIZER_CODE = (
    _bytes_to_unicode,
    _merge_pair,
    _clip_vocab_and_merges,
    _t5_vocab,
    build_tiny_tokenizers,
    text_config,
)
MISTRAL_TOKENIZER_CODE = (_t5_vocab, build_tiny_mistral_tokenizer)
