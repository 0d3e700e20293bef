"""Default text, offline: the Wikipedia articles shipped inside the `gensim` wheel, split by
article into a calibration part and an evaluation part that never overlap.

The split is deterministic and independent of any model or method: articles (redirects
dropped) are ordered by page id and every `EVAL_EVERY`-th one goes to evaluation. Text is
lightly cleaned of wiki markup that `gensim.corpora.wikicorpus.filter_wiki` leaves behind.

Also: token windows for calibration (seeded random windows of the calibration text) and
for evaluation (the GPTQ protocol: texts joined, tokenized once, non-overlapping windows)."""
import bz2
import functools
import hashlib
import importlib.util
import os
import re

import torch

GENSIM_WIKI = os.path.join(
    "test", "test_data", "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
EVAL_EVERY = 4          # article k (in page-id order) is an evaluation article iff k % 4 == 1
EVAL_OFFSET = 1
JOIN = "\n\n"


class DataError(RuntimeError):
    pass


def gensim_wiki_path():
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise DataError("the default text needs the `gensim` package (pip install gensim): "
                        "its wheel carries the Wikipedia articles used for calibration and "
                        "evaluation")
    path = os.path.join(os.path.dirname(spec.origin), GENSIM_WIKI)
    if not os.path.exists(path):
        raise DataError(f"gensim is installed but its Wikipedia test file is missing: {path}")
    return path


_QUOTES = re.compile(r"'{2,}")
_SPACES = re.compile(r"[ \t]+")
_BLANKS = re.compile(r"\n{3,}")


def clean_wiki_text(text):
    """What filter_wiki leaves: bold/italic quote runs, ragged whitespace, runs of blank lines."""
    text = _QUOTES.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    text = "\n".join(lines)
    return _BLANKS.sub("\n\n", text).strip()


@functools.lru_cache(maxsize=2)
def _articles(path):
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    out = []
    with bz2.open(path, "rb") as f:
        for title, text, pageid in extract_pages(f):
            if text.lstrip().upper().startswith("#REDIRECT"):
                continue
            body = clean_wiki_text(filter_wiki(text))
            if len(body) < 200:
                continue
            out.append((int(pageid), title, body))
    out.sort(key=lambda a: a[0])
    return tuple(out)


def wiki_articles(path=None):
    """[(page_id, title, text)] in page-id order, redirects and stubs dropped."""
    return list(_articles(path or gensim_wiki_path()))


def split_articles(path=None):
    """(calibration, evaluation): two disjoint lists of (page_id, title, text)."""
    arts = wiki_articles(path)
    evaluation = [a for k, a in enumerate(arts) if k % EVAL_EVERY == EVAL_OFFSET]
    calibration = [a for k, a in enumerate(arts) if k % EVAL_EVERY != EVAL_OFFSET]
    eval_ids = {a[0] for a in evaluation}
    eval_text = {hashlib.sha1(a[2].encode()).hexdigest() for a in evaluation}
    for a in calibration:   # the invariant the whole evaluation rests on
        if a[0] in eval_ids or hashlib.sha1(a[2].encode()).hexdigest() in eval_text:
            raise DataError(f"article {a[1]!r} is in both calibration and evaluation")
    return calibration, evaluation


def default_texts(split):
    """The texts of the 'calibration' or 'evaluation' part of the default corpus."""
    cal, ev = split_articles()
    if split in ("calibration", "calib", "train"):
        return [a[2] for a in cal]
    if split in ("evaluation", "eval", "test"):
        return [a[2] for a in ev]
    raise DataError(f"unknown split {split!r}: use 'calibration' or 'evaluation'")


def read_text_file(path):
    """A user's own text: a .txt file (articles separated by blank lines are fine)."""
    if not os.path.isfile(path):
        raise DataError(f"text file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise DataError(f"text file is empty: {path}")
    return [text]


def tokenize_joined(tokenizer, texts):
    """GPTQ protocol: join with blank lines, tokenize once. Returns a 1-D int64 tensor."""
    text = JOIN.join(texts)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False,
                    verbose=False).input_ids[0]
    return ids.to(torch.int64)


def eval_windows(ids, window, max_tokens=None):
    """Non-overlapping windows of `window` tokens from the start of ids: (count, window).
    max_tokens limits the total (rounded down to whole windows)."""
    if window < 2:
        raise DataError("evaluation window must be at least 2 tokens")
    total = ids.numel() if max_tokens is None else min(ids.numel(), int(max_tokens))
    count = total // window
    if count == 0:
        raise DataError(f"not enough evaluation text: {ids.numel()} tokens, window {window}")
    return ids[:count * window].view(count, window)


def calibration_windows(ids, count, length, seed=0):
    """`count` windows of `length` tokens at seeded random offsets of the calibration ids
    (windows may overlap each other; never the evaluation text)."""
    if ids.numel() < length + 1:
        raise DataError(f"not enough calibration text: {ids.numel()} tokens, window {length}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (count,), generator=g)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])


def default_calibration(tokenizer, tokens=16384, length=512, seed=0, texts=None):
    """Calibration batch (count, length) with count * length ~= tokens."""
    ids = tokenize_joined(tokenizer, texts if texts is not None else default_texts("calibration"))
    count = max(1, int(tokens) // length)
    return calibration_windows(ids, count, length, seed)


def default_evaluation(tokenizer, texts=None):
    """The whole evaluation text as one 1-D token tensor (slice it with eval_windows)."""
    return tokenize_joined(tokenizer, texts if texts is not None else default_texts("evaluation"))
