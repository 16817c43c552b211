"""Incremental detokenization: turn a growing list of tokens into text pieces to stream.

Decoding the whole list each time (answers are short) keeps merges and multi-byte
characters right; a piece is held back while it ends in an incomplete character."""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.shown = ""

    def push(self, token: int) -> str:
        """Add a token; return the new text it completes ('' while a character is partial)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") or len(text) <= len(self.shown):
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece

    def flush(self) -> str:
        """Whatever is still held back, at the end of the answer."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        piece, self.shown = text[len(self.shown):], text
        return piece
