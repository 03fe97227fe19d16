"""Real English text for calibration and evaluation, read from installed packages.

The machines this project runs on reach package registries but no model hub, so text comes
from gensim's bundled test data (``pip install --no-deps gensim``). gensim is never imported:
its import pulls numpy/scipy extensions we do not need; we only read files it ships.

The two sources are disjoint, so evaluation measures generalisation, not recall of the
calibration set:

* calibration: ``lee_background.cor`` — 299 Australian news articles (Lee corpus, ~360 KB).
* evaluation:  ``enwiki-latest-pages-articles*shortened*.bz2`` — 106 Wikipedia articles,
  wiki markup stripped (~3.1M characters).
"""

from __future__ import annotations

import bz2
import functools
import html
import importlib.util
import pathlib
import re
from typing import Any

import torch

from anyquant.errors import AnyquantError

_INSTALL_FIX = "pip install --no-deps gensim"

CALIBRATION_FILE = "lee_background.cor"
EVALUATION_GLOB = "enwiki-latest-pages-articles*shortened*.bz2"


def gensim_test_data_dir() -> pathlib.Path:
    """Directory of gensim's bundled test data, located without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise AnyquantError(
            "the gensim package is not installed; anyquant reads its bundled test text "
            f"(lee_background.cor, enwiki-*.bz2) for calibration and evaluation. Fix: {_INSTALL_FIX}"
        )
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"
    if not path.is_dir():
        raise AnyquantError(
            f"{path} does not exist: this gensim install ships without its test data. "
            f"Fix: {_INSTALL_FIX} (a full wheel from PyPI includes test/test_data)"
        )
    return path


def _data_file(pattern: str) -> pathlib.Path:
    directory = gensim_test_data_dir()
    matches = sorted(directory.glob(pattern))
    if not matches:
        raise AnyquantError(
            f"no file matching {pattern!r} in {directory}. Fix: reinstall gensim "
            f"({_INSTALL_FIX}); its wheel ships this file"
        )
    return matches[0]


@functools.lru_cache(maxsize=1)
def calibration_text() -> str:
    """News text for calibration (Lee background corpus: one article per line).

    Disjoint from :func:`evaluation_text`: different source (newswire vs. Wikipedia).
    """
    return _data_file(CALIBRATION_FILE).read_text(encoding="utf-8", errors="replace")


@functools.lru_cache(maxsize=1)
def evaluation_text() -> str:
    """Held-out Wikipedia prose for evaluation, wiki markup stripped.

    Disjoint from :func:`calibration_text` (which is newswire), so quantization calibrated on
    one is never scored on the same text. Cached: decompressing and cleaning takes ~1-2 s.
    """
    path = _data_file(EVALUATION_GLOB)
    try:
        xml = bz2.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    except OSError as exc:  # bz2 raises OSError on corrupt data
        raise AnyquantError(f"{path} is not valid bz2 ({exc}). Fix: reinstall: {_INSTALL_FIX}") from exc
    articles = []
    for page in _PAGE.finditer(xml):
        body = page.group(0)
        text_match = _TEXT.search(body)
        if text_match is None:
            continue
        raw = html.unescape(text_match.group(1))
        if raw.lstrip().upper().startswith("#REDIRECT"):
            continue  # redirects are one line of markup, no prose
        cleaned = strip_wiki_markup(raw)
        if cleaned:
            title_match = _TITLE.search(body)
            title = html.unescape(title_match.group(1)).strip() if title_match else ""
            articles.append(f"{title}\n\n{cleaned}" if title else cleaned)
    if not articles:
        raise AnyquantError(f"{path} contained no <page><text> articles. Fix: reinstall: {_INSTALL_FIX}")
    return "\n\n".join(articles) + "\n"


_PAGE = re.compile(r"<page>.*?</page>", re.S)
_TEXT = re.compile(r"<text\b[^>]*>(.*?)</text>", re.S)
_TITLE = re.compile(r"<title>(.*?)</title>", re.S)

_COMMENT = re.compile(r"<!--.*?-->", re.S)
# <ref>s hold citations (mostly templates and URLs), not prose; <math>/<gallery> etc. hold no
# sentences a language model should be scored on.
_DROP_ELEMENTS = re.compile(
    r"<(ref|math|gallery|timeline|syntaxhighlight|source|score|imagemap|hiero|chem)\b[^>]*?(?<!/)>.*?</\1\s*>",
    re.S | re.I,
)
_SELF_CLOSING_REF = re.compile(r"<ref\b[^>]*/>", re.I)
_TAG = re.compile(r"</?[A-Za-z][^<>]*?/?>")
# `|}` must not swallow the `|` of a template's trailing `|}}`.
_BRACE_TOKEN = re.compile(r"\{\{|\}\}|\{\||\|\}(?!\})")
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_DROP_NAMESPACES = re.compile(r"^\s*:?\s*(file|image|category|media)\s*:", re.I)
_INTERWIKI = re.compile(r"^\s*[a-z][a-z-]{1,11}\s*:")
_EXT_LINK_LABEL = re.compile(r"\[(?:https?:|ftp:|//)[^\s\]]*\s+([^\]]*)\]")
_EXT_LINK_BARE = re.compile(r"\[(?:https?:|ftp:|//)[^\s\]]*\]")
_HEADING = re.compile(r"^[ \t]*(=+)[ \t]*(.*?)[ \t]*\1[ \t]*$", re.M)
_LIST_MARKER = re.compile(r"^[ \t]*[*#:;]+[ \t]*", re.M)
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_LEFTOVER = re.compile(r"\[\[|\]\]|\{\{|\}\}|\{\||\|\}")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.M)
_BLANK_LINES = re.compile(r"\n{3,}")


def _drop_braced(text: str) -> str:
    """Remove templates ``{{...}}`` and tables ``{|...|}``, nested in any mix.

    One depth counter over brace tokens found by regex: linear in the text, unlike repeated
    innermost-first substitution, and tables inside templates (or vice versa) come out together.
    """
    out = []
    depth = 0
    pos = 0
    for token in _BRACE_TOKEN.finditer(text):
        opening = token.group(0) in ("{{", "{|")
        if depth == 0:
            if opening:
                out.append(text[pos : token.start()])
            else:
                continue  # stray closer outside any template: left for the leftover sweep
        depth += 1 if opening else -1
        if depth == 0:
            pos = token.end()
    if depth == 0:
        out.append(text[pos:])
    # An unclosed template eats the rest of its article only; we clean one article at a time.
    return "".join(out)


def _resolve_link(match: re.Match[str]) -> str:
    inner = match.group(1)
    if _DROP_NAMESPACES.match(inner):
        return ""
    target, bar, label = inner.partition("|")
    if bar:
        return label
    if _INTERWIKI.match(target):
        return ""  # [[de:Anarchismus]] language links: not prose
    return target.lstrip(":")


def strip_wiki_markup(wikitext: str) -> str:
    """Plain prose from MediaWiki markup (entities already unescaped).

    Good enough for perplexity text, not a full parser: templates, tables, file/category
    links, references and HTML tags are removed; links keep their visible label.
    """
    text = _COMMENT.sub("", wikitext)
    text = _DROP_ELEMENTS.sub("", text)
    text = _SELF_CLOSING_REF.sub("", text)
    text = _drop_braced(text)
    # Innermost links first, so a [[File:...|caption with [[link]]]] resolves its caption's
    # link before the whole file link is dropped.
    while True:
        text, count = _INNER_LINK.subn(_resolve_link, text)
        if count == 0:
            break
    text = _EXT_LINK_LABEL.sub(r"\1", text)
    text = _EXT_LINK_BARE.sub("", text)
    text = _TAG.sub("", text)
    text = text.replace("'''", "").replace("''", "")
    text = _HEADING.sub(r"\2", text)
    text = _LIST_MARKER.sub("", text)
    text = _MAGIC_WORD.sub("", text)
    text = _LEFTOVER.sub("", text)
    # Entities double-escaped in the dump (&amp;nbsp;) survive the first unescape.
    text = html.unescape(text).replace("\xa0", " ")
    text = _TRAILING_SPACE.sub("", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def _encode(tokenizer: Any, text: str) -> list[int]:
    # encode() is the one API both HF slow and fast tokenizers share with the same result type
    # (a flat list of ids); __call__ returns a BatchEncoding whose shape depends on input type.
    try:
        # verbose=False silences HF's "sequence longer than model max length" warning: we cut
        # the ids into windows ourselves.
        ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
    except TypeError:
        ids = tokenizer.encode(text, add_special_tokens=False)
    return list(ids)


def token_windows(
    tokenizer: Any,
    text: str,
    max_tokens: int = 16384,
    window: int = 512,
    bos: bool = True,
) -> torch.LongTensor:
    """Cut the first ``max_tokens`` tokens of ``text`` into non-overlapping rows of ``window``.

    With ``bos`` and a tokenizer that has a BOS token, each row is ``[bos] + window - 1`` text
    tokens, so row length is always ``window`` (the model's context budget). Models like
    Gemma score far worse without BOS, and every window then starts the way training did.
    A trailing partial window is dropped so all windows weigh the same, unless the text is
    too short for even one full window, in which case the single short row is kept.
    Returns a LongTensor ``[n_windows, window]``. Deterministic.
    """
    if window < 2:
        raise AnyquantError(f"token_windows: window={window} must be >= 2 (one context token and one target)")
    if max_tokens < 1:
        raise AnyquantError(f"token_windows: max_tokens={max_tokens} must be >= 1")
    bos_id = getattr(tokenizer, "bos_token_id", None) if bos else None
    per_row = window - 1 if bos_id is not None else window

    ids = _encode_prefix(tokenizer, text, max_tokens)
    if not ids:
        raise AnyquantError("token_windows: the text produced no tokens (calibration text for --calib, evaluation text for --text); give a file with words in it")
    ids = ids[:max_tokens]
    n_rows = len(ids) // per_row
    if n_rows == 0:
        rows = [ids]
    else:
        rows = [ids[i * per_row : (i + 1) * per_row] for i in range(n_rows)]
    if bos_id is not None:
        rows = [[int(bos_id)] + row for row in rows]
    return torch.tensor(rows, dtype=torch.long)


def _encode_prefix(tokenizer: Any, text: str, max_tokens: int) -> list[int]:
    """Tokens of a prefix of ``text`` long enough to yield ``max_tokens`` tokens.

    Tokenizing all 3M characters of the evaluation text takes seconds we do not need. A prefix
    cut at whitespace tokenizes identically to the full text up to the cut (BPE pre-tokenizers
    split on whitespace), and we keep a margin so the cut never reaches the tokens we use.
    """
    margin = 64
    n_chars = max(4096, (max_tokens + margin) * 8)
    while True:
        if n_chars >= len(text):
            return _encode(tokenizer, text)
        cut = text.rfind(" ", 0, n_chars)
        prefix = text[: cut if cut > 0 else n_chars]
        ids = _encode(tokenizer, prefix)
        if len(ids) >= max_tokens + margin:
            return ids
        n_chars *= 2
