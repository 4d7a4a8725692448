"""Training SentencePiece tokenizers in-process (the vocabulary classes live in `s2s_jax.vocab`)."""

from __future__ import annotations

import io
import re

import sentencepiece as spm

from s2s_jax.data.errors import DataError
from s2s_jax.vocab import BOS_ID, EOS_ID, PAD_ID, SPECIALS, UNK_ID, SentencePieceVocab

SPM_THREADS = 4
_TOO_HIGH = re.compile(r"Vocabulary size (?:is )?too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def train_sentencepiece(sentences, model_prefix: str, *, vocab_size: int, model_type: str,
                        character_coverage: float, what: str) -> SentencePieceVocab:
    """Trains a SentencePiece model on an iterable of normalised sentences, in-process.

    Writes `model_prefix.model`; the bytes depend only on the sentences (in order) and the
    settings. `what` names the training text in error messages.
    A vocabulary size the corpus cannot support is a DataError saying which size works.
    """
    sentences = list(sentences)
    # The model comes back in memory (model_writer), not through model_prefix, which
    # SentencePiece would record in the model: the bytes would then depend on the folder.
    model = io.BytesIO()
    kwargs = dict(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        pad_piece=SPECIALS[0], bos_piece=SPECIALS[1], eos_piece=SPECIALS[2], unk_piece=SPECIALS[3],
        # The text is already normalised by us (normalize()); "identity" keeps SentencePiece from
        # applying its own NFKC a second time, so data.normalization=none really means none.
        normalization_rule_name="identity",
        # Every sentence given, in the order given: prepare passes its own seeded sample
        # (data.spm_sample_size), so SentencePiece's unseeded shuffle never runs.
        input_sentence_size=0, shuffle_input_sentence=False, seed_sentencepiece_size=1_000_000,
        # A fixed thread count: the unigram EM sums per-thread partial counts, so the model
        # bytes depend on it (not on data.prepare_workers or the machine).
        max_sentence_length=16384, num_threads=SPM_THREADS,
        train_extremely_large_corpus=False, minloglevel=2,
    )
    if model_type == "word":
        kwargs["split_by_whitespace"] = True
    spm.set_random_generator_seed(0)
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except RuntimeError as e:
        msg = str(e)
        m = _TOO_HIGH.search(msg)
        if m:
            raise DataError(f"{what}: data.vocab_size={vocab_size} is more than this corpus supports "
                            f"for a {model_type} model; lower data.vocab_size to at most {m.group(2)}") from None
        m = _TOO_SMALL.search(msg)
        if m:
            raise DataError(f"{what}: data.vocab_size={vocab_size} is smaller than the {m.group(2)} distinct "
                            f"characters needed; raise data.vocab_size to more than {m.group(2)} or lower "
                            f"data.spm_character_coverage (e.g. 0.9995)") from None
        raise DataError(f"{what}: SentencePiece training failed ({msg.strip().splitlines()[-1] if msg.strip() else msg}); "
                        f"check data.vocab_size / data.spm_model_type / data.spm_character_coverage") from None
    with open(model_prefix + ".model", "wb") as f:
        f.write(model.getvalue())
    return SentencePieceVocab(model_prefix + ".model")
