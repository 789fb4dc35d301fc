"""Tokenizers: the embedded byte-level BPE trained on the corpus, or any AutoTokenizer."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from zeroforge.data.errors import DataError

EOS = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # EOS doubles as padding: batched generation pads on the left and masks it out.
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as err:
        raise DataError(
            f"tokenizer {str(name_or_path)!r} could not be loaded; expected a hub name or a directory with tokenizer files ({err})."
        ) from None
    if tok.eos_token is None:
        raise DataError(f"tokenizer {str(name_or_path)!r} has no EOS token; documents need one as separator.")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_hash(tok: PreTrainedTokenizerBase) -> str:
    """Identifies the token mapping itself, not the files it was saved as."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        from tokenizers import Tokenizer

        # Padding and truncation are per-call state (batched generation pads on the left), not
        # part of the mapping: hash a copy without them.
        backend = Tokenizer.from_str(backend.to_str())
        backend.no_padding()
        backend.no_truncation()
    text = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
