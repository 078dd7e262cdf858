"""Shakespeare text as character ids: the vocabulary of TFF's (and FedML's) ``fed_shakespeare``, with
pad/bos/eos/oov ids, and snippets cut into fixed-length rows."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# The 86 characters of TFF's (and FedML's) Shakespeare character vocabulary, in their id order.
SHAKESPEARE_CHARS = "dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r"
SHAKESPEARE_PAD = 0
SHAKESPEARE_BOS = len(SHAKESPEARE_CHARS) + 1
SHAKESPEARE_EOS = len(SHAKESPEARE_CHARS) + 2
SHAKESPEARE_OOV = len(SHAKESPEARE_CHARS) + 3
SHAKESPEARE_VOCAB_SIZE = len(SHAKESPEARE_CHARS) + 4
SHAKESPEARE_SEQ_LEN = 80


def _char_table() -> np.ndarray:
    """Code point (capped at 128) → id; anything outside the 86 characters is OOV."""
    table = np.full(129, SHAKESPEARE_OOV, dtype=np.int64)
    for i, char in enumerate(SHAKESPEARE_CHARS):
        table[ord(char)] = i + 1
    return table


def shakespeare_chunks(snippets: Iterable[str | bytes], seq_len: int = SHAKESPEARE_SEQ_LEN) -> np.ndarray:
    """Each snippet → ``[bos] + char ids + [eos]``, cut into rows of ``seq_len + 1``, the last padded with 0."""
    table = _char_table()
    width = seq_len + 1
    pieces = []
    for snippet in snippets:
        text = snippet.decode("utf-8", errors="replace") if isinstance(snippet, bytes) else str(snippet)
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = table[np.minimum(codes, 128)]
        total = len(ids) + 2
        padded = np.full(-(-total // width) * width, SHAKESPEARE_PAD, dtype=np.int64)
        padded[0] = SHAKESPEARE_BOS
        padded[1 : len(ids) + 1] = ids
        padded[len(ids) + 1] = SHAKESPEARE_EOS
        pieces.append(padded)
    if not pieces:
        return np.zeros((0, width), dtype=np.int64)
    return np.concatenate(pieces).reshape(-1, width)
