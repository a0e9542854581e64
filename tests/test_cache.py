"""Tests for excise.models.cache: location, keys, atomic writes, manifests, and rebuilding broken entries."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from excise.models import cache


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "excise-cache"
    monkeypatch.setenv(cache.CACHE_ENV, str(root))
    return root


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(8, 4, generator=generator), "bias": torch.randn(4, generator=generator)}


def _leftovers(folder: Path) -> list[str]:
    """Names of temporary files or folders the atomic writers left behind."""
    return sorted(path.name for path in folder.rglob("*") if path.name.endswith(".tmp"))


def test_cache_dir_follows_environment_then_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "a"))
    assert cache.cache_dir() == (tmp_path / "a").resolve()
    assert cache.cache_dir(tmp_path / "b") == (tmp_path / "b").resolve()
    monkeypatch.delenv(cache.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == (tmp_path / "home" / ".cache" / "excise").resolve()
    assert not (tmp_path / "home").exists(), "cache_dir must not create folders"


def test_cache_path_stays_inside_the_cache(cache_root: Path) -> None:
    assert cache.cache_path("models", "m", "x.safetensors") == cache_root.resolve() / "models" / "m" / "x.safetensors"
    for bad in ("..", "", ".", "a/b", "/etc", "~user"):
        with pytest.raises(ValueError, match="invalid cache path part"):
            cache.cache_path("models", bad)
    with pytest.raises(ValueError, match="at least one part"):
        cache.cache_path()
    with pytest.raises(TypeError, match="must be str"):
        cache.cache_path("models", 3)  # type: ignore[arg-type]


def test_settings_key_depends_on_content_not_order() -> None:
    key = cache.settings_key({"layer": 3, "model": "m", "n": 100})
    assert key == cache.settings_key({"n": 100, "model": "m", "layer": 3})
    assert key != cache.settings_key({"layer": 4, "model": "m", "n": 100})
    assert len(key) == 16
    assert int(key, 16) >= 0
    with pytest.raises(TypeError, match="JSON-serialisable"):
        cache.settings_key({"dtype": torch.float32})


def test_atomic_write_bytes_replaces_content(cache_root: Path) -> None:
    path = cache.cache_path("blobs", "x.bin")
    cache.atomic_write_bytes(path, b"first")
    cache.atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert _leftovers(cache_root) == []


def test_safetensors_round_trip_with_manifest(cache_root: Path) -> None:
    path = cache.cache_path("stats", "cov.safetensors")
    tensors = _tensors()
    cache.atomic_save_safetensors(tensors, path, {"layer": "3"})
    loaded, metadata = cache.load_safetensors(path)
    assert metadata == {"layer": "3"}
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    manifest = json.loads(cache.manifest_path(path).read_text())
    assert manifest["files"]["cov.safetensors"]["sha256"] == cache.sha256_file(path)
    assert manifest["files"]["cov.safetensors"]["size"] == path.stat().st_size
    assert _leftovers(cache_root) == []


def test_failed_save_leaves_nothing(cache_root: Path) -> None:
    path = cache.cache_path("stats", "bad.safetensors")
    with pytest.raises(TypeError, match="str to str"):
        cache.atomic_save_safetensors(_tensors(), path, {"layer": 3})  # type: ignore[dict-item]
    shared = torch.zeros(4)
    with pytest.raises(RuntimeError, match="share memory"):  # raised by safetensors while writing
        cache.atomic_save_safetensors({"a": shared, "b": shared}, path)
    assert not path.exists()
    assert not cache.manifest_path(path).exists()
    assert _leftovers(cache_root) == []


def test_missing_entry_is_a_miss_not_corruption(cache_root: Path) -> None:
    with pytest.raises(cache.CacheMissError):
        cache.load_safetensors(cache.cache_path("stats", "absent.safetensors"))
    with pytest.raises(cache.CacheMissError):
        cache.verify_folder(cache.cache_path("models", "absent"))


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "drop_manifest", "drop_data", "garble_manifest"])
def test_damaged_file_entry_is_detected(cache_root: Path, damage: str) -> None:
    path = cache.cache_path("stats", "cov.safetensors")
    cache.atomic_save_safetensors(_tensors(), path)
    cache.verify_file(path)  # intact before the damage
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    elif damage == "drop_manifest":
        cache.manifest_path(path).unlink()
    elif damage == "drop_data":
        path.unlink()
    else:
        cache.manifest_path(path).write_text("{not json")
    with pytest.raises(cache.CacheCorruptError):
        cache.load_safetensors(path)


def test_cached_safetensors_rebuilds_truncated_entry(cache_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = cache.cache_path("stats", "cov.safetensors")
    calls = []

    def build() -> dict[str, torch.Tensor]:
        calls.append(1)
        return _tensors(seed=len(calls))

    first = cache.cached_safetensors(path, build)
    again = cache.cached_safetensors(path, build)
    assert len(calls) == 1
    torch.testing.assert_close(again["weight"], first["weight"], rtol=0, atol=0)

    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="excise.models.cache"):
        rebuilt = cache.cached_safetensors(path, build)
    assert len(calls) == 2
    assert any("Rebuilding broken cache entry" in record.message for record in caplog.records)
    torch.testing.assert_close(rebuilt["weight"], _tensors(seed=2)["weight"], rtol=0, atol=0)
    cache.verify_file(path)


def test_cached_file_writes_through_a_temporary_path(cache_root: Path) -> None:
    path = cache.cache_path("blobs", "data.bin")
    seen: list[Path] = []

    def build(temporary: Path) -> None:
        seen.append(temporary)
        temporary.write_bytes(b"payload")

    assert cache.cached_file(path, build, {"kind": "test"}) == path
    assert cache.cached_file(path, build) == path
    assert len(seen) == 1
    assert seen[0] != path
    assert seen[0].parent == path.parent
    assert path.read_bytes() == b"payload"
    assert cache.verify_file(path) == {"kind": "test"}


def test_cached_folder_rebuilds_after_damage(cache_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = cache.cache_path("models", "toy", "entry")
    calls = []

    def build(temporary: Path) -> None:
        calls.append(temporary)
        assert temporary != folder
        assert temporary.parent == folder.parent
        (temporary / "weights.bin").write_bytes(bytes(range(256)) * 8)
        (temporary / "sub").mkdir()
        (temporary / "sub" / "config.json").write_text('{"a": 1}')

    assert cache.cached_folder(folder, build, {"model": "toy"}) == folder
    cache.cached_folder(folder, build)
    assert len(calls) == 1
    assert cache.verify_folder(folder) == {"model": "toy"}
    assert set(json.loads((folder / cache.MANIFEST_NAME).read_text())["files"]) == {"weights.bin", "sub/config.json"}

    weights = folder / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(cache.CacheCorruptError, match="truncated"):
        cache.verify_folder(folder)
    with caplog.at_level(logging.WARNING, logger="excise.models.cache"):
        cache.cached_folder(folder, build)
    assert len(calls) == 2
    assert any("Rebuilding broken cache entry" in record.message for record in caplog.records)
    cache.verify_folder(folder)

    (folder / cache.MANIFEST_NAME).unlink()
    with pytest.raises(cache.CacheCorruptError, match=r"no MANIFEST\.json"):
        cache.verify_folder(folder)


def test_cached_folder_cleans_up_failed_build(cache_root: Path) -> None:
    folder = cache.cache_path("models", "toy", "entry")

    def build(temporary: Path) -> None:
        (temporary / "half.bin").write_bytes(b"x")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        cache.cached_folder(folder, build)
    assert not folder.exists()
    assert list(folder.parent.iterdir()) == []


def test_folder_manifest_rejects_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="contains no files"):
        cache.write_folder_manifest(tmp_path)
