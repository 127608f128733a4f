"""Unicode normalisation of ``prompt`` and ``response``: the text every later stage and the exact-dedup key see.

Per text, in this order: Unicode normal form (NFC by default); drop C0/C1 control characters except tab and
newline, zero-width spaces and BOMs; CRLF / CR -> LF; no-break and other fixed-width spaces -> space (the
ideographic space U+3000 is kept: it is CJK punctuation, not layout); trailing spaces before a newline removed;
runs of 3+ newlines -> one blank line; leading/trailing whitespace trimmed. Indentation inside lines is kept
(code). The input's own columns are left untouched, so nothing is lost.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from engine.config import NormalizeConfig
from engine.stage import Stage, set_column

STR = pa.large_string()
# One RE2 pass for everything that is deleted outright (controls, zero-width space, BOM, soft hyphen).
_DELETE = r"[\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F\x{200B}\x{FEFF}\x{00AD}]"
_SPACES = r"[\x{00A0}\x{2000}-\x{200A}\x{202F}\x{205F}]"


def normalize_text(arr: pa.Array, form: str = "NFC") -> pa.Array:
    """Normalise a string column (see the module docstring); nulls stay null."""
    out = pc.utf8_normalize(arr, form=form)
    # The remaining passes only matter for rows that contain one of the characters involved; a cheap
    # match_substring_regex over the column first skips the rewrites entirely on clean batches (most of them).
    if pc.any(pc.match_substring_regex(out, _DELETE)).as_py():
        out = pc.replace_substring_regex(out, _DELETE, "")
    if pc.any(pc.match_substring(out, "\r")).as_py():
        out = pc.replace_substring(out, "\r\n", "\n")
        out = pc.replace_substring(out, "\r", "\n")
    if pc.any(pc.match_substring_regex(out, _SPACES)).as_py():
        out = pc.replace_substring_regex(out, _SPACES, " ")
    if pc.any(pc.match_substring_regex(out, r"[ \t]+\n|\n\n\n")).as_py():
        out = pc.replace_substring_regex(out, r"[ \t]+\n", "\n")
        out = pc.replace_substring_regex(out, r"\n{3,}", "\n\n")
    return pc.utf8_trim_whitespace(out).cast(STR)


class NormalizeStage(Stage):
    name = "normalize"

    def __init__(self, config: NormalizeConfig | None = None):
        super().__init__(config or NormalizeConfig())

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if not self.config.enabled:
            return batch
        for col in ("prompt", "response"):
            before = batch.column(col)
            after = normalize_text(before, self.config.form)
            self.count(f"{col}_changed", int(pc.sum(pc.not_equal(before, after).cast(pa.int64())).as_py() or 0))
            batch = set_column(batch, col, after)
        return batch
