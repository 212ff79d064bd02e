"""A byte-level BPE tokenizer trained with the ``tokenizers`` library.

Byte-level means every string round-trips exactly (no unknown token): text is mapped to bytes,
bytes to 256 printable symbols, and BPE merges learned on top. Encoding with special tokens
prepends ``<s>`` (as Llama does); the corpus pipeline encodes without them and joins documents
with ``</s>``.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["BOS", "EOS", "PAD", "train_tokenizer"]

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    min_frequency: int = 2,
    model_max_length: int | None = None,
):
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        texts: training texts (any iterable; consumed once).
        vocab_size: final vocabulary including the 256 byte symbols and the 3 special tokens.
        min_frequency: a pair must occur this often to be merged.
        model_max_length: recorded in the tokenizer (the model's context), or None.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``bos_token`` ``<s>``, ``eos_token`` ``</s>`` and
        ``pad_token`` ``<pad>`` (ids 0, 1, 2); ``save_pretrained`` / ``AutoTokenizer`` work.

    Raises:
        ValueError: ``vocab_size`` too small for the byte alphabet and special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, PAD]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ValueError(f"vocab_size must be an integer, got {vocab_size!r}")
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(
            f"vocab_size must be >= {len(alphabet) + len(specials)} "
            f"(256 bytes + {len(specials)} special tokens), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
