"""Text for calibration and evaluation: a file, or a real corpus shipped inside gensim's wheel.

``--text`` accepts a path or one of
  gensim:wiki-calib   first half of gensim's Wikipedia sample (cleaned with filter_wiki)
  gensim:wiki-eval    its second half (never used for calibration)
  gensim:lee          the Lee news corpus (a different genre, held out)
  gensim:lee-calib    the second half of the Lee corpus's documents, for calibrating on news
                      (evaluation reads the first 16384 tokens, ~22% of it: no overlap)
The Wikipedia halves split the cleaned, non-redirect pages joined by blank lines at the
middle character, so calibration and evaluation never share text.
"""

from __future__ import annotations

import bz2
import functools
from pathlib import Path

from .errors import InputError

WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SOURCES = ("gensim:wiki-calib", "gensim:wiki-eval", "gensim:lee", "gensim:lee-calib")


def _quiet_gensim() -> None:
    """gensim logs at INFO while its test helpers import; keep that off the console."""
    import logging

    logging.getLogger("gensim").setLevel(logging.WARNING)


@functools.lru_cache(maxsize=1)
def _wiki_halves() -> tuple[str, str]:
    _quiet_gensim()
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
        from gensim.test.utils import datapath
    except ImportError:
        raise InputError("gensim is needed for gensim:* texts: pip install gensim") from None
    pages = extract_pages(bz2.BZ2File(datapath(WIKI)))
    texts = [filter_wiki(t).strip() for _, t, _ in pages]
    texts = [t for t in texts if t and not t.lower().startswith("#redirect")]
    full = "\n\n".join(texts)
    half = len(full) // 2
    return full[:half], full[half:]


def _lee() -> str:
    _quiet_gensim()
    try:
        from gensim.test.utils import datapath
    except ImportError:
        raise InputError("gensim is needed for gensim:* texts: pip install gensim") from None
    return Path(datapath("lee_background.cor")).read_text(encoding="utf-8")


def load_text(spec: str) -> str:
    if spec == "gensim:wiki-calib":
        return _wiki_halves()[0]
    if spec == "gensim:wiki-eval":
        return _wiki_halves()[1]
    if spec == "gensim:lee":
        return _lee()
    if spec == "gensim:lee-calib":
        docs = _lee().splitlines(keepends=True)  # one news story per line
        return "".join(docs[len(docs) // 2 :])
    if spec.startswith("gensim:"):
        raise InputError(f"--text {spec}: unknown corpus (choose {', '.join(SOURCES)})")
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"--text {spec}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"--text {spec}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise InputError(f"--text {spec}: file is empty")
    return text
