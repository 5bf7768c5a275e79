"""What a file is, from its first bytes, so a wrong file gets a message that names what it is.

Extensions lie (a text file saved as ``.tflite``, an HTML error page saved as
``.onnx`` by a failed download); the first bytes rarely do. A TFLite flatbuffer
carries ``TFL3`` at offset 4; an ONNX ``ModelProto`` is a protobuf whose first
field is almost always ``ir_version`` (field 1, varint: byte ``0x08``); an
``.npz`` is a zip archive. ``describe`` names everything else well enough for a
one-line error.
"""

from __future__ import annotations

import string

ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
PRINTABLE = set(string.printable.encode())

# (magic at offset 0, what it is) for formats people mistake for models or sample files.
KNOWN = (
    (b"\x93NUMPY", "a single NumPy .npy array, not an .npz archive"),
    (ZIP_MAGIC, "a zip archive"),
    (EMPTY_ZIP_MAGIC, "an empty zip archive"),
    (b"\x89HDF", "an HDF5 file (a Keras .h5 model?)"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"%PDF", "a PDF document"),
    (b"\x7fELF", "an ELF executable"),
)


def is_tflite(head: bytes) -> bool:
    return len(head) >= 8 and head[4:8] == b"TFL3"


def looks_like_onnx(head: bytes) -> bool:
    """A protobuf starting with field 1 as a varint (``ir_version``), as every exporter writes it."""
    return len(head) >= 2 and head[0] == 0x08 and 0 < head[1] < 0x80


def is_zip(head: bytes) -> bool:
    return head.startswith(ZIP_MAGIC) or head.startswith(EMPTY_ZIP_MAGIC)


def describe(head: bytes) -> str:
    """A short phrase for what ``head`` (the file's first bytes) looks like."""
    if not head:
        return "an empty file"
    if is_tflite(head):
        return "a TFLite flatbuffer"
    for magic, what in KNOWN:
        if head.startswith(magic):
            return what
    if looks_like_onnx(head):
        return "an ONNX model (a protobuf starting with ir_version)"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "a Python pickle (a PyTorch .pt/.pth checkpoint?)"
    stripped = head.lstrip()
    if stripped[:1] in (b"<",):
        return f"an HTML/XML text file (starts with {_quote(stripped)})"
    if stripped[:1] in (b"{", b"["):
        return f"a JSON text file (starts with {_quote(stripped)})"
    if all(b in PRINTABLE for b in head[:64]):
        return f"a text file (starts with {_quote(stripped)})"
    return f"an unrecognised binary file (first bytes {head[:8].hex(' ')})"


def _quote(head: bytes) -> str:
    text = head[:24].decode("ascii", "replace").splitlines()[0] if head.strip() else ""
    return repr(text + ("..." if len(head) > 24 else ""))


def read_head(path: object, size: int = 64) -> bytes:
    with open(str(path), "rb") as fh:
        return fh.read(size)
