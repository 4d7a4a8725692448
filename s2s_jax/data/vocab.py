"""Character vocabulary of the built-in tasks. PAD=0, BOS=1, EOS=2, UNK=3, then printable ASCII.

The same special ids are used by the SentencePiece tokenizers of real data, so the model, the
loss and decoding only ever rely on these four constants.
"""

from __future__ import annotations

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


class CharVocab:
    """Fixed character vocabulary: the 4 specials, then the 95 printable ASCII characters."""

    kind = "char"

    def __init__(self):
        self.itos = list(SPECIALS) + [chr(c) for c in range(32, 127)]
        self.stoi = {s: i for i, s in enumerate(self.itos)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(ch, UNK_ID) for ch in text]

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID):
                continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) and i != UNK_ID else "?")
        return "".join(out)

    def pieces(self, ids) -> list[str]:
        """Per-token strings, for attention plots."""
        return [self.itos[int(i)] if 0 <= int(i) < len(self.itos) else "?" for i in ids]

    def to_json(self) -> dict:
        return {"kind": "char"}
