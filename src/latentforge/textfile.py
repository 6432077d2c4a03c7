"""Text files a user wrote by hand (captions, metadata.jsonl, --config TOML), decoded the way their editor saved them.

    decode(b"\\xff\\xfea\\x00")  -> "a"        UTF-16 with its byte-order mark (Windows Notepad's "Unicode")
    decode(b"\\xef\\xbb\\xbfa")  -> "a"        UTF-8 with a byte-order mark (Notepad's "UTF-8 with BOM")
    decode(b"a\\x00 \\x00")     -> "a "       UTF-16-LE without a mark (every other byte NUL: ASCII text)

A byte-order mark names its encoding unambiguously (Unicode 15, §23.8 and Table 2-4), so such a file is read,
not refused; anything else must be UTF-8. A NUL byte is never part of a caption or of TOML: one without the
UTF-16 pattern is refused (TextFileError) rather than handed on to a tokenizer or parser.
"""

from __future__ import annotations

import codecs

__all__ = ["decode", "TextFileError"]

_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),  # UTF-32 first: FF FE 00 00
         (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


class TextFileError(ValueError):
    """The bytes are not text in an encoding we can know; `str(e)` says why and what to do (one clause)."""


def decode(data: bytes) -> str:
    """The text of a hand-written file: by its byte-order mark, else UTF-16 without a mark when every other byte
    is NUL (ASCII text saved as UTF-16), else UTF-8. Raises TextFileError naming the first bad byte."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return _decode(data[len(bom):], encoding, len(bom))
    if b"\x00" in data:
        if len(data) % 2 == 0 and not any(data[1::2]):
            return _decode(data, "utf-16-le", 0)
        if len(data) % 2 == 0 and not any(data[0::2]):
            return _decode(data, "utf-16-be", 0)
        raise TextFileError(f"byte {data.index(0)}: a NUL byte, so not a text file; save it as UTF-8")
    return _decode(data, "utf-8", 0)


def _decode(body: bytes, encoding: str, offset: int) -> str:
    try:
        return body.decode(encoding)
    except UnicodeDecodeError as e:
        raise TextFileError(f"byte {offset + e.start}: {e.reason} ({encoding.upper()}); save it as UTF-8") from None
