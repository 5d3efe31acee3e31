"""The embedded default: a tiny Llama-architecture model and the demo dataset, both offline.

``builtin:tiny`` is written once as a real HF model folder (config, safetensors weights, a
byte-level tokenizer with a chat template) in a cache directory, and then loaded through the
same ``from_pretrained`` path as any local model. Its weights are random, from a fixed seed;
the demo dataset is small and regular enough for it to learn visibly on a CPU in a minute.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

TINY = "builtin:tiny"
DEMO = "builtin:demo"
# Bump when the model or tokenizer recipe changes, so stale caches are never reused.
TINY_VERSION = "v3"


# A real folder in a checkout and in an installed wheel alike (never a zip), so a Path.
RESOURCES = Path(str(resources.files("tunedeck.resources")))
DEMO_FILE = RESOURCES / "demo" / "demo.jsonl"
# What the window opens on the first time and tunedeck-train runs without a config.
DEMO_PRESET = RESOURCES / "presets" / "demo.yaml"

SPECIALS = ["<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def cache_dir() -> Path:
    root = os.environ.get("TUNEDECK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tunedeck"
    )
    return Path(root)


def tiny_model_dir() -> Path:
    """The folder of ``builtin:tiny``, written on first use (atomically, so racing writers are safe)."""
    target = cache_dir() / f"builtin-tiny-{TINY_VERSION}"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        _write_tiny(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its folder is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tokenizer():
    """A byte-level BPE tokenizer with no merges: every byte is a token, so nothing is unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _write_tiny(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        # 1/sqrt(hidden): the usual 0.02 suits widths near 2048 and leaves a model this narrow unable to
        # move its logits far from uniform.
        initializer_range=128**-0.5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
