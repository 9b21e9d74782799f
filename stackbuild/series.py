"""Patches: parsing the forms they come in, and applying them with a verdict each.

Parsing accepts what real patches look like and is safe to accept: CRLF line endings,
hunk headers whose line counts were edited by hand (recounted), plain `diff -u`
output without git headers, extra leading path components (diffs made against an
installed site-packages), `git format-patch` mbox series and gzip+base64 artifacts.
Anything else is `malformed`, with the reason.

Applying is done in memory against the files of a tree: each hunk must match exactly
at its stated line or at an offset; fuzz (dropping context lines) is refused unless
the recipe allows it for that patch, because fuzz is how applied-twice and
wrong-place patches hide. A patch whose reverse applies is `already applied`.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from stackbuild.treewrite import UnsafePath, verify_path

DEP3_FIELDS = (
    "Description", "Subject", "Author", "From", "Origin", "Bug", "Forwarded",
    "Applied-Upstream", "Last-Update", "Reviewed-By", "Signed-off-by",
)

_HUNK_RE = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@(.*)$")
_MBOX_FROM_RE = re.compile(r"^From [0-9a-f]{40} ")
_DEV_NULL = "/dev/null"
CRLF_NOTE = "CRLF line endings normalised"


class PatchVerdict(str, Enum):
    APPLIED = "applied"
    APPLIED_OFFSET = "applied with offset"
    APPLIED_FUZZ = "applied with fuzz"
    ALREADY_APPLIED = "already applied"
    CONFLICT = "conflict"
    MALFORMED = "malformed"
    MISSING_FILE = "missing file"
    NOT_ATTEMPTED = "not attempted"

    @property
    def ok(self) -> bool:
        return self in (
            PatchVerdict.APPLIED,
            PatchVerdict.APPLIED_OFFSET,
            PatchVerdict.APPLIED_FUZZ,
            PatchVerdict.ALREADY_APPLIED,
        )


class MalformedPatch(Exception):
    """The text is not a patch we can apply safely; the message says why."""


@dataclass(frozen=True)
class Hunk:
    old_start: int
    old_len: int
    new_start: int
    new_len: int
    lines: tuple[str, ...]  # each starts with ' ', '-' or '+' (no newline)
    section: str = ""
    no_newline_old: bool = False
    no_newline_new: bool = False

    @property
    def old_lines(self) -> list[str]:
        return [ln[1:] for ln in self.lines if ln[0] in " -"]

    @property
    def new_lines(self) -> list[str]:
        return [ln[1:] for ln in self.lines if ln[0] in " +"]


@dataclass(frozen=True)
class FilePatch:
    old_path: str | None  # None for a new file (after strip)
    new_path: str | None  # None for a deleted file
    hunks: tuple[Hunk, ...]
    raw_old: str = ""
    raw_new: str = ""
    new_mode: str | None = None
    is_rename: bool = False
    is_copy: bool = False  # git's `copy from`/`copy to`: the new file starts as a copy of the old

    @property
    def path(self) -> str:
        return self.new_path or self.old_path or ""

    @property
    def is_new(self) -> bool:
        return self.old_path is None

    @property
    def is_delete(self) -> bool:
        return self.new_path is None


@dataclass(frozen=True)
class ParsedPatch:
    header: dict[str, str]
    description: str
    files: tuple[FilePatch, ...]
    notes: tuple[str, ...] = ()  # what was repaired on the way (CRLF, recounts, ...)


@dataclass(frozen=True)
class ApplyOutcome:
    verdict: PatchVerdict
    detail: str
    new_contents: dict[str, str | None] = field(default_factory=dict)  # path -> text (None: delete)
    modes: dict[str, str] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    failures: tuple[str, ...] = ()  # every hunk that did not apply ("path: hunk N (@@ ... @@) does not match")
    applied: tuple[str, ...] = ()  # on a conflict: the files whose hunks all applied
    hints: tuple[str, ...] = ()  # on a conflict: what would make it apply (fuzz, whitespace)


# ------------------------------------------------------------------ decoding


def decode_patch_bytes(data: bytes, name: str = "") -> tuple[str, list[str]]:
    """Bytes as found on disk -> patch text, undoing gzip and base64 wrappers."""
    notes: list[str] = []
    stripped = data.strip()
    if name.endswith(".b64") or (stripped and _looks_base64(stripped)):
        try:
            data = base64.b64decode(b"".join(stripped.split()), validate=True)
            notes.append("base64-decoded")
        except (binascii.Error, ValueError) as e:
            raise MalformedPatch(f"looks base64-encoded but does not decode: {e}") from None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
            notes.append("gunzipped")
        except (OSError, EOFError, zlib.error) as e:
            raise MalformedPatch(f"gzip data is corrupt: {e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
        notes.append("not UTF-8; read as latin-1")
    # Every line ending in CRLF: the transport (a mailer, a Windows editor) added them.
    # CR on some lines only: they belong to files with CRLF endings and stay.
    if "\r\n" in text and all(ln.endswith("\r") for ln in text.split("\n")[:-1]):
        text = text.replace("\r\n", "\n")
        notes.append(CRLF_NOTE)
    return text, notes


def _looks_base64(data: bytes) -> bool:
    head = data[:4096]
    if b"\n---" in head or head.startswith((b"---", b"diff", b"From ", b"Index:")):
        return False
    return re.fullmatch(rb"[A-Za-z0-9+/=\s]+", head) is not None and data.startswith(b"H4sI")


def split_mbox(text: str) -> list[str]:
    """A `git format-patch` series (several mails in one file) -> one text per commit."""
    lines = text.split("\n")
    starts = [i for i, ln in enumerate(lines) if _MBOX_FROM_RE.match(ln)]
    if len(starts) <= 1:
        return [text]
    return ["\n".join(lines[a:b]) for a, b in zip(starts, [*starts[1:], len(lines)], strict=True)]


# ------------------------------------------------------------------ parsing


def parse_patch(text: str, strip: int = 1, notes: list[str] | None = None) -> ParsedPatch:
    notes = list(notes or [])
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for n, ln in enumerate(lines, 1):
        # `diff -r` says "Binary files ... differ" instead of a diff: skipping the line
        # would drop the change and still call the patch applied
        if ln == "GIT binary patch" or (ln.startswith("Binary files ") and ln.endswith(" differ")):
            raise MalformedPatch(f"line {n}: {ln!r}: binary patches are not supported")
    # header: everything before the first file header
    i = 0
    while i < len(lines) and not _is_file_start(lines, i):
        i += 1
    header_lines = lines[:i]
    header, description = _parse_header(header_lines)
    files: list[FilePatch] = []
    while i < len(lines):
        if not _is_file_start(lines, i):
            i += 1
            continue
        fp, i = _parse_file(lines, i, strip, notes)
        files.append(fp)
    if not files:
        raise MalformedPatch("no file changes found (no 'diff --git' or '---'/'+++' headers)")
    for fp in files:
        for p in (fp.old_path, fp.new_path):
            if p is not None:
                check_safe_path(p)
    return ParsedPatch(header, description, tuple(files), tuple(notes))


def _is_file_start(lines: list[str], i: int) -> bool:
    ln = lines[i]
    if ln.startswith("diff --git "):
        return True
    return ln.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ ")


def _parse_header(lines: list[str]) -> tuple[dict[str, str], str]:
    header: dict[str, str] = {}
    key: str | None = None
    body: list[str] = []
    for ln in lines:
        m = re.match(r"^([A-Za-z][A-Za-z-]*):\s?(.*)$", ln)
        if m and (m.group(1) in DEP3_FIELDS or m.group(1).startswith("X-")):
            key = m.group(1)
            header[key] = m.group(2).strip()
        elif key and ln.startswith((" ", "\t")) and ln.strip():
            header[key] += "\n" + ln.strip()
        else:
            key = None
            if ln.strip() and not ln.startswith(("From ", "Date: ", "---", "index ")) and not re.match(r"^ \S.*\|\s+\d+", ln):
                body.append(ln)
    subject = header.get("Subject", "")
    subject = re.sub(r"^\[PATCH[^\]]*\]\s*", "", subject)
    desc = header.get("Description") or subject or (body[0].strip() if body else "")
    return header, desc.split("\n")[0].strip()


_C_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92, '"': 34}


def unquote_git_path(raw: str) -> tuple[str, str]:
    """A name as git writes it -> (name, the rest of the text after it).

    git C-quotes a name holding a double quote, a backslash, a control character or
    (with core.quotePath, the default) a byte above 0x7f: `"b/caf\\303\\251.py"`. The
    escapes are git's (quote.c unquote_c_style): \\a \\b \\f \\n \\r \\t \\v \\\\ \\" and
    three octal digits for one byte; the bytes are UTF-8. An unquoted name is taken as
    it stands."""
    if not raw.startswith('"'):
        return raw, ""
    out = bytearray()
    i = 1
    while i < len(raw):
        ch = raw[i]
        if ch == '"':
            try:
                return out.decode("utf-8"), raw[i + 1 :]
            except UnicodeDecodeError:
                raise MalformedPatch(f"quoted name {raw!r} is not UTF-8") from None
        if ch == "\\":
            nxt = raw[i + 1 : i + 2]
            if nxt in _C_ESCAPES:
                out.append(_C_ESCAPES[nxt])
                i += 2
                continue
            octal = raw[i + 1 : i + 4]
            if len(octal) == 3 and all(c in "01234567" for c in octal) and int(octal, 8) < 256:
                out.append(int(octal, 8))
                i += 4
                continue
            raise MalformedPatch(f"quoted name {raw!r} has an unknown escape \\{nxt}")
        out.extend(ch.encode("utf-8"))
        i += 1
    raise MalformedPatch(f"quoted name {raw!r} has no closing quote")


def quote_git_path(name: str) -> str:
    """`name` as git writes it in a diff: C-quoted when it holds a double quote, a
    backslash, a control character, a tab or space at an end (so `unquote_git_path`
    and git apply read back exactly `name`)."""
    if not any(c in name for c in '"\\') and name == name.strip() and all(ord(c) >= 0x20 and ord(c) != 0x7F for c in name):
        return name
    rev = {v: k for k, v in _C_ESCAPES.items()}
    out = []
    for b in name.encode("utf-8"):
        if b in rev:
            out.append("\\" + rev[b])
        elif b < 0x20 or b >= 0x7F:
            out.append(f"\\{b:03o}")
        else:
            out.append(chr(b))
    return '"' + "".join(out) + '"'


def _header_name(raw: str) -> str:
    """The name in a `---`/`+++` line (after the marker): quoted names unquoted, a
    tab-separated timestamp (diff -u) dropped."""
    raw = raw.rstrip("\r")
    if raw.startswith('"'):
        return unquote_git_path(raw)[0]
    return raw.split("\t")[0].strip()


def _strip_path(raw: str, strip: int) -> str | None:
    path = _header_name(raw)
    if path == _DEV_NULL:
        return None
    parts = [p for p in path.split("/") if p not in ("", ".")]
    lead = 1 if path.startswith("/") else 0
    if len(parts) <= strip - lead and strip > 0:
        raise MalformedPatch(f"path {path!r} has fewer than {strip} leading components to strip")
    if path.startswith("/"):
        # an absolute path only survives if strip removes its root-relative components
        kept = parts[strip - 1 :] if strip > 0 else None
        if kept is None:
            raise MalformedPatch(f"path {path!r} is absolute")
        return "/".join(kept)
    return "/".join(parts[strip:])


def check_safe_path(path: str) -> None:
    """git's rule for a tree entry (stackbuild.treewrite.verify_path): MalformedPatch
    naming the path and the rule. The tree writer checks again on the final path."""
    try:
        verify_path(path)
    except UnsafePath as e:
        raise MalformedPatch(str(e)) from None


def _diff_git_names(rest: str) -> tuple[str, str] | None:
    """The two names of a `diff --git` line (after the prefix) as written (still
    quoted where git quoted them). For unquoted names with spaces, the split where both
    sides name the same file (git's rule when there is no rename)."""
    if rest.startswith('"'):
        tail = unquote_git_path(rest)[1]
        return rest[: len(rest) - len(tail)], tail.lstrip(" ")
    if ' "' in rest:
        i = rest.index(' "')
        return rest[:i], rest[i + 1 :]
    spaces = [i for i, c in enumerate(rest) if c == " "]
    for i in spaces:
        a, b = rest[:i], rest[i + 1 :]
        if a.split("/", 1)[-1] == b.split("/", 1)[-1]:
            return a, b
    if len(spaces) == 1:
        return rest[: spaces[0]], rest[spaces[0] + 1 :]
    return None


def _parse_file(lines: list[str], i: int, strip: int, notes: list[str]) -> tuple[FilePatch, int]:
    old_raw = new_raw = ""
    new_mode = None
    is_new = is_delete = is_rename = is_copy = False
    rename_from = rename_to = None
    if lines[i].startswith("diff --git "):
        names = _diff_git_names(lines[i][len("diff --git "):])
        if names:
            old_raw, new_raw = names
        i += 1
        while i < len(lines) and not lines[i].startswith(("--- ", "@@", "diff --git ")):
            ln = lines[i]
            if ln.startswith("new file mode "):
                is_new = True
                new_mode = ln.split()[-1]
            elif ln.startswith("deleted file mode "):
                is_delete = True
            elif ln.startswith("new mode "):
                new_mode = ln.split()[-1]
            elif ln.startswith("rename from "):
                is_rename, rename_from = True, unquote_git_path(ln[len("rename from "):])[0]
            elif ln.startswith("rename to "):
                rename_to = unquote_git_path(ln[len("rename to "):])[0]
            elif ln.startswith("copy from "):
                is_copy, rename_from = True, unquote_git_path(ln[len("copy from "):])[0]
            elif ln.startswith("copy to "):
                rename_to = unquote_git_path(ln[len("copy to "):])[0]
            elif ln.startswith(("Binary files ", "GIT binary patch")):
                raise MalformedPatch(f"binary change to {new_raw or old_raw}: binary patches are not supported")
            i += 1
    if i < len(lines) and lines[i].startswith("--- "):
        if i + 1 >= len(lines) or not lines[i + 1].startswith("+++ "):
            raise MalformedPatch(f"line {i + 1}: '---' header without '+++'")
        old_raw, new_raw = lines[i][4:], lines[i + 1][4:]
        i += 2
    if not old_raw and not new_raw:
        raise MalformedPatch(f"line {i}: file header without paths")
    if new_mode is not None and new_mode not in ("100644", "100755"):
        # 120000 (a symbolic link) or 160000 (a submodule): a link could point anywhere
        raise MalformedPatch(f"line {i}: file mode {new_mode} (a symbolic link or submodule) is not supported")
    old_path = None if is_new else _strip_path(old_raw, strip)
    new_path = None if is_delete else _strip_path(new_raw, strip)
    if (is_rename or is_copy) and rename_from and rename_to:
        old_path, new_path = rename_from, rename_to
    if _header_name(old_raw) == _DEV_NULL:
        old_path = None
    if _header_name(new_raw) == _DEV_NULL:
        new_path = None
    hunks: list[Hunk] = []
    while i < len(lines) and lines[i].startswith("@@"):
        h, i = _parse_hunk(lines, i, notes, new_path or old_path or "")
        hunks.append(h)
    return FilePatch(old_path, new_path, tuple(hunks), old_raw, new_raw, new_mode, is_rename, is_copy), i


def _hunk_goes_on(lines: list[str], j: int) -> bool:
    """Hunk lines follow the blank lines that start at `j` (callers ask once per run
    of blank lines: asking per line made parsing quadratic in the run's length)."""
    while j < len(lines) and lines[j] == "":
        j += 1
    if j >= len(lines) or lines[j][0] not in " +-" or _is_file_start(lines, j):
        return False
    return not _is_signature(lines, j)


def _is_signature(lines: list[str], i: int) -> bool:
    """`-- ` followed by git's version line and the end of the mail: the signature,
    even when a hand-edited header over-counts the hunk above it."""
    if lines[i] != "-- ":
        return False
    rest: list[str] = []
    for ln in lines[i + 1 :]:
        if ln.strip():
            rest.append(ln)
            if len(rest) > 1:
                return False
    return all(re.match(r"^\d+(\.\d+)+", ln) for ln in rest)


def _parse_hunk(lines: list[str], i: int, notes: list[str], path: str) -> tuple[Hunk, int]:
    m = _HUNK_RE.match(lines[i])
    if not m:
        raise MalformedPatch(f"line {i + 1}: bad hunk header {lines[i]!r}")
    old_start, old_len = int(m.group(1)), int(m.group(2) if m.group(2) is not None else 1)
    new_start, new_len = int(m.group(3)), int(m.group(4) if m.group(4) is not None else 1)
    header_line = i + 1
    i += 1
    body: list[str] = []
    nn_old = nn_new = False
    n_old = n_new = 0
    run_end, run_goes_on = -1, False
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("\\"):
            # "\ No newline at end of file" applies to the previous line
            if body and body[-1][0] in " -":
                nn_old = True
            if body and body[-1][0] in " +":
                nn_new = True
            i += 1
            continue
        if ln.startswith("@@") or ln.startswith("diff --git ") or _is_file_start(lines, i):
            break
        if ln == "":
            # an empty context line whose leading space was eaten by an editor; only
            # when the hunk evidently goes on (the header said more lines follow, or
            # hunk lines follow: stopping there would silently drop half the hunk)
            if n_old < old_len or n_new < new_len:
                ln = " "
            else:
                if run_end <= i:  # once per run of blank lines
                    run_end = i
                    while run_end < len(lines) and lines[run_end] == "":
                        run_end += 1
                    run_goes_on = _hunk_goes_on(lines, run_end)
                if not run_goes_on:
                    break
                ln = " "
        if ln[0] not in " +-":
            break
        if ln.startswith("-- ") and (n_old >= old_len and n_new >= new_len or _is_signature(lines, i)):
            break  # the signature separator of a format-patch mail
        body.append(ln)
        if ln[0] in " -":
            n_old += 1
        if ln[0] in " +":
            n_new += 1
        i += 1
    if not body:
        raise MalformedPatch(f"{path}: hunk at line {header_line} is empty")
    if (n_old, n_new) != (old_len, new_len):
        notes.append(
            f"{path}: hunk at line {header_line} header said -{old_len} +{new_len}, "
            f"recounted -{n_old} +{n_new}"
        )
    return Hunk(old_start, n_old, new_start, n_new, tuple(body), m.group(5).strip(), nn_old, nn_new), i


# ------------------------------------------------------------------ applying


def resolve_paths(parsed: ParsedPatch, exists: Callable[[str], bool]) -> tuple[ParsedPatch, list[str]]:
    """Which file each change is for, as every patch tool decides it.

    - A new file comes only from `/dev/null` (or git's `new file mode`).
    - A plain diff whose `---` and `+++` names differ (`diff -u` between a checkout
      and a site-packages copy, or `x.py.orig` vs `x.py`) changes ONE file: the name
      that is in the tree, the `---` name first. It never creates the other.
    - Extra leading components (a diff made against site-packages) are dropped when
      the stripped name is not in the tree but a shorter suffix of it is.
    - In the tree under neither name: named as GNU patch would (see below).
    The notes say which name was chosen and what was dropped."""
    notes: list[str] = []
    out: list[FilePatch] = []
    for fp in parsed.files:
        old, new = fp.old_path, fp.new_path
        if old is None:
            out.append(fp)
            continue
        two_names = not fp.is_rename and not fp.is_copy and new is not None and new != old
        names = [old, new] if two_names and new is not None else [old]
        found: tuple[int, str] | None = None
        for k in range(0, max(len(n.split("/")) for n in names)):
            for name in names:
                parts = name.split("/")
                if k < len(parts) and exists("/".join(parts[k:])):
                    found = (k, name)
                    break
            if found:
                break
        if found is None:
            # in the tree under neither name: a missing file, never a new one; named as
            # GNU patch picks without a tree (fewest components, shortest base name,
            # shortest name), so `x.py.orig` vs `x.py` is x.py
            if two_names:
                pick = min(names, key=lambda n: (n.count("/"), len(n.rsplit("/", 1)[-1]), len(n)))
                out.append(FilePatch(pick, pick, fp.hunks, fp.raw_old, fp.raw_new, fp.new_mode, False))
            else:
                out.append(fp)
            continue
        fixed, name = found

        def cut(p: str | None, k: int = fixed) -> str | None:
            return "/".join(p.split("/")[k:]) if p else p

        if fixed:
            notes.append(f"{name}: dropped {fixed} extra leading path component(s) -> {cut(name)}")
        if two_names:
            target = cut(name)
            which = "---" if name == old else "+++"
            other = new if name == old else old
            notes.append(f"the '---' and '+++' names differ; patched {target} (the '{which}' name, which is in "
                         f"the tree), not {other}")
            out.append(FilePatch(target, target, fp.hunks, fp.raw_old, fp.raw_new, fp.new_mode, False))
        elif fixed:
            out.append(FilePatch(cut(old), cut(new), fp.hunks, fp.raw_old, fp.raw_new, fp.new_mode, fp.is_rename, fp.is_copy))
        else:
            out.append(fp)
    return ParsedPatch(parsed.header, parsed.description, tuple(out), parsed.notes), notes


def _find(haystack: list[str], needle: list[str], start: int) -> int | None:
    """Nearest position of `needle` in `haystack` to `start` (0-based), or None."""
    n = len(needle)
    if n == 0:
        return max(0, min(start, len(haystack)))
    limit = len(haystack) - n
    if limit < 0:
        return None
    first = needle[0]
    for delta in range(0, max(start, limit - start) + 1):
        # at equal distance the later place first, as git apply (apply.c find_pos) and GNU patch do
        for pos in (start + delta, start - delta) if delta else (start,):
            if 0 <= pos <= limit and haystack[pos] == first and haystack[pos : pos + n] == needle:
                return pos
    return None


@dataclass
class _FileResult:
    lines: list[str] | None
    offset_used: bool = False
    fuzz_used: int = 0
    failed: list[tuple[int, Hunk]] = field(default_factory=list)


def _hunk_label(h: Hunk) -> str:
    return f"@@ -{h.old_start},{h.old_len} +{h.new_start},{h.new_len} @@{' ' + h.section if h.section else ''}"


def _apply_hunks(path: str, lines: list[str], hunks: tuple[Hunk, ...], fuzz: int, reverse: bool) -> _FileResult:
    """Apply every hunk that matches; the ones that do not are listed in `failed` (and
    then `lines` is None), so a conflict can name all of them, as patch(1) does."""
    out = list(lines)
    shift = 0
    res = _FileResult(None)
    for n, h in enumerate(hunks, 1):
        old = h.new_lines if reverse else h.old_lines
        new = h.old_lines if reverse else h.new_lines
        start = (h.new_start if reverse else h.old_start) - 1 + shift
        if (h.new_len if reverse else h.old_len) == 0:
            start += 1  # "-0,0" / "@@ -N,0" means: insert after line N
        start = max(start, 0)
        pos = _find(out, old, start)
        used_fuzz = 0
        if pos is None and fuzz > 0:
            lead, trail = _context_lines(h)
            for f in range(1, fuzz + 1):
                cut_lead, cut_trail = min(f, lead), min(f, trail)
                core = old[cut_lead : len(old) - cut_trail]
                if not core:
                    continue
                p = _find(out, core, start + cut_lead)
                if p is not None:
                    pos, used_fuzz = p, f
                    new = new[cut_lead : len(new) - cut_trail]
                    old = core
                    break
        if pos is None:
            res.failed.append((n, h))
            continue
        if pos != start:
            res.offset_used = True
        res.fuzz_used = max(res.fuzz_used, used_fuzz)
        out[pos : pos + len(old)] = new
        shift += len(new) - len(old) + (pos - start)
    if not res.failed:
        res.lines = out
    return res


def _context_lines(h: Hunk) -> tuple[int, int]:
    """How many context lines open and close the hunk (what fuzz may drop)."""
    kinds = [ln[0] for ln in h.lines]
    lead = next((i for i, k in enumerate(kinds) if k != " "), len(kinds))
    trail = next((i for i, k in enumerate(reversed(kinds)) if k != " "), len(kinds))
    return lead, trail


def _split(text: str) -> tuple[list[str], bool]:
    if text == "":
        return [], True
    ends_nl = text.endswith("\n")
    return text.split("\n")[:-1] if ends_nl else text.split("\n"), ends_nl


def _join(lines: list[str], ends_nl: bool) -> str:
    if not lines:
        return ""
    return "\n".join(lines) + ("\n" if ends_nl else "")


def apply_parsed(
    parsed: ParsedPatch,
    read: Callable[[str], str | None],
    fuzz: int = 0,
) -> ApplyOutcome:
    """Apply in memory. `read(path)` returns a file's text or None when absent."""
    read = _read_once(read)  # path repair, forward and reverse all look at the same files
    parsed, path_notes = resolve_paths(parsed, lambda p: read(p) is not None)
    notes = list(parsed.notes) + path_notes
    touched = tuple(dict.fromkeys(fp.path for fp in parsed.files))
    crlf = CRLF_NOTE in parsed.notes

    # forward
    forward = _try(parsed, read, fuzz, reverse=False, crlf=crlf)
    if forward.ok:
        if forward.fuzz:
            verdict, detail = PatchVerdict.APPLIED_FUZZ, f"fuzz {forward.fuzz} (allowed by the recipe)"
        elif forward.offset:
            verdict, detail = PatchVerdict.APPLIED_OFFSET, "hunks matched at an offset"
        else:
            verdict, detail = PatchVerdict.APPLIED, ""
        return ApplyOutcome(verdict, _with_notes(detail, notes), forward.contents, forward.modes, touched, tuple(notes))
    # reverse: is the change already there?
    if _try(parsed, read, 0, reverse=True, crlf=crlf).ok:
        return ApplyOutcome(
            PatchVerdict.ALREADY_APPLIED,
            _with_notes("the reverse applies: change already present; skipped", notes),
            {}, {}, touched, tuple(notes),
        )
    failures = tuple(forward.problems)
    applied = tuple(f for f in forward.applied if f not in forward.failed_files)
    if forward.missing and not forward.problems:
        detail = "; ".join(f"{m}: not in the tree" for m in forward.missing)
        return ApplyOutcome(PatchVerdict.MISSING_FILE, _with_notes(detail, notes), {}, {}, touched, tuple(notes),
                            failures=tuple(f"{m}: not in the tree" for m in forward.missing), applied=applied)
    hints = _hints(parsed, read, fuzz, forward, crlf)
    summary = list(forward.summary) + [f"{m}: not in the tree" for m in forward.missing]
    if applied:
        summary.append(f"applied cleanly: {', '.join(applied)}")
    summary += hints
    return ApplyOutcome(PatchVerdict.CONFLICT, _with_notes("; ".join(summary) or "does not apply", notes), {}, {},
                        touched, tuple(notes), failures=failures + tuple(f"{m}: not in the tree" for m in forward.missing),
                        applied=applied, hints=tuple(hints))


def _hints(parsed: ParsedPatch, read: Callable[[str], str | None], fuzz: int, forward: _Attempt, crlf: bool) -> list[str]:
    """What would have made a conflict apply: fuzz the recipe does not allow, or a
    difference in whitespace or line endings only."""
    hints: list[str] = []
    for f in range(fuzz + 1, 3):
        if _try(parsed, read, f, reverse=False, crlf=crlf).ok:
            hints.append(f"applies with fuzz {f} (allow with `fuzz = {f}`)")
            break
    if forward.whitespace_only and forward.failed_files:
        hints.append(forward.whitespace_only)
    return hints


def _read_once(read: Callable[[str], str | None]) -> Callable[[str], str | None]:
    seen: dict[str, str | None] = {}

    def cached(path: str) -> str | None:
        if path not in seen:
            seen[path] = read(path)
        return seen[path]

    return cached


def _with_notes(detail: str, notes: list[str]) -> str:
    return "; ".join(x for x in [detail, *notes] if x)


@dataclass
class _Attempt:
    contents: dict[str, str | None] = field(default_factory=dict)
    modes: dict[str, str] = field(default_factory=dict)
    offset: bool = False
    fuzz: int = 0
    problems: list[str] = field(default_factory=list)  # one per failing hunk (or file)
    summary: list[str] = field(default_factory=list)  # one per failing file
    missing: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    failed_files: list[str] = field(default_factory=list)
    whitespace_only: str = ""  # set when every failing hunk matches ignoring whitespace

    @property
    def ok(self) -> bool:
        return not self.problems and not self.missing


def _norm_ws(line: str) -> str:
    return " ".join(line.split())


def _whitespace_only(path: str, lines: list[str], failed: list[tuple[int, Hunk]], reverse: bool) -> str:
    """Why the failing hunks fail, when it is only whitespace or line endings."""
    norm = [_norm_ws(ln) for ln in lines]
    hunks = tuple(Hunk(h.old_start, h.old_len, h.new_start, h.new_len, tuple(ln[0] + _norm_ws(ln[1:]) for ln in h.lines))
                  for _, h in failed)
    if _apply_hunks(path, norm, hunks, 0, reverse).lines is None:
        return ""
    file_crlf = bool(lines) and all(ln.endswith("\r") for ln in lines)
    patch_crlf = any(ln.endswith("\r") for _, h in failed for ln in h.lines)
    if file_crlf != patch_crlf:
        return (f"{path}: only line endings differ (the file has {'CRLF' if file_crlf else 'LF'}, "
                f"the patch {'CRLF' if patch_crlf else 'LF'})")
    return f"{path}: only whitespace differs"


def _try(parsed: ParsedPatch, read: Callable[[str], str | None], fuzz: int, reverse: bool, crlf: bool = False) -> _Attempt:
    """Apply every file of the patch, collecting every failing hunk (the result is
    usable only when `ok`). With `crlf` (the patch's every line ended in CRLF), a file
    whose every line ends in CRLF is patched without its CRs and gets them back."""
    att = _Attempt()
    ws_notes: list[str] = []
    ws_all = True
    for fp in parsed.files:
        src_path = fp.new_path if reverse else fp.old_path
        dst_path = fp.old_path if reverse else fp.new_path
        if src_path is None:
            assert dst_path is not None
            existing = att.contents.get(dst_path) if dst_path in att.contents else read(dst_path)
            if existing is not None:
                new_text = _join(*_new_file_lines(fp, reverse))
                why = "already exists with the patch's content" if existing == new_text and not reverse else \
                    "is to be created but already exists"
                att.problems.append(f"{dst_path}: {why}")
                att.summary.append(f"{dst_path}: {why}")
                att.failed_files.append(dst_path)
                ws_all = False
                continue
            lines, ends = _new_file_lines(fp, reverse)
            att.contents[dst_path] = _join(lines, ends)
            att.applied.append(dst_path)
            if fp.new_mode and not reverse:
                att.modes[dst_path] = fp.new_mode
            continue
        text = att.contents[src_path] if src_path in att.contents else read(src_path)
        if text is None:
            att.missing.append(src_path)
            continue
        if (fp.is_copy or fp.is_rename) and dst_path is not None and dst_path != src_path and \
                (att.contents[dst_path] if dst_path in att.contents else read(dst_path)) is not None:
            why = f"is the target of a {'copy' if fp.is_copy else 'rename'} but already exists"
            att.problems.append(f"{dst_path}: {why}")
            att.summary.append(f"{dst_path}: {why}")
            att.failed_files.append(dst_path)
            ws_all = False
            continue
        lines, ends = _split(text)
        cr = crlf and bool(lines) and all(ln.endswith("\r") for ln in lines[:-1]) and \
            (lines[-1].endswith("\r") or not ends) and not any(ln.endswith("\r") for h in fp.hunks for ln in h.lines)
        last_cr = bool(lines) and lines[-1].endswith("\r")
        work = [ln[:-1] if ln.endswith("\r") else ln for ln in lines] if cr else lines
        r = _apply_hunks(src_path, work, fp.hunks, fuzz, reverse)
        if r.lines is None:
            for n, h in r.failed:
                att.problems.append(f"{src_path}: hunk {n} ({_hunk_label(h)}) does not match")
            if len(r.failed) == 1:
                n, h = r.failed[0]
                att.summary.append(f"{src_path}: hunk {n} ({_hunk_label(h)}) does not match")
            else:
                att.summary.append(f"{src_path}: hunks {', '.join(f'{n} ({_hunk_label(h)})' for n, h in r.failed)} do not match")
            att.failed_files.append(src_path)
            why = _whitespace_only(src_path, lines, r.failed, reverse)
            ws_all = ws_all and bool(why)
            ws_notes.append(why)
            continue
        out_lines = r.lines
        if cr:
            out_lines = [ln + "\r" for ln in out_lines]
            if out_lines and not last_cr and not ends:
                out_lines[-1] = out_lines[-1][:-1]
        att.offset |= r.offset_used
        att.fuzz = max(att.fuzz, r.fuzz_used)
        last = fp.hunks[-1] if fp.hunks else None
        if last is not None:
            nn = last.no_newline_old if reverse else last.no_newline_new
            touches_end = out_lines and (last.old_start - 1 + last.old_len >= len(lines) - 1)
            if touches_end:
                ends = not nn
        if dst_path is None:
            if out_lines:
                att.problems.append(f"{src_path}: to be deleted but content differs")
                att.summary.append(f"{src_path}: to be deleted but content differs")
                att.failed_files.append(src_path)
                ws_all = False
                continue
            att.contents[src_path] = None
            att.applied.append(src_path)
            continue
        if fp.is_rename and dst_path != src_path:
            att.contents[src_path] = None
        att.contents[dst_path] = _join(out_lines, ends)
        att.applied.append(dst_path)
        if fp.new_mode and not reverse:
            att.modes[dst_path] = fp.new_mode
    if att.failed_files and ws_all:
        att.whitespace_only = "; ".join(ws_notes)
    return att


def _new_file_lines(fp: FilePatch, reverse: bool) -> tuple[list[str], bool]:
    lines: list[str] = []
    nn = False
    for h in fp.hunks:
        lines.extend(h.old_lines if reverse else h.new_lines)
        nn = h.no_newline_old if reverse else h.no_newline_new
    return lines, not nn


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_patch_file(path: Path) -> tuple[bytes, str, list[str]]:
    data = path.read_bytes()
    text, notes = decode_patch_bytes(data, path.name)
    return data, text, notes
