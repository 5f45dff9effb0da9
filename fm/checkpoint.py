"""Release folders: a training checkpoint exported for others, and loaded back with strict checks (docs/RELEASE.md).

    fm export runs/finetune/x/checkpoints/last.ckpt --out releases/fm-velocity     # or a DeepSpeed ZeRO folder
    python -c "import fm; m = fm.load_pretrained('releases/fm-velocity', attention='blocks'); print(m.head_name)"

A release folder holds ``model.safetensors`` (the encoder's weights as ``encoder.*``, a fine-tuned head's as
``head.*``; a baseline's release, of a cellDancer, scVI or scScope checkpoint, holds its head alone and no encoder),
``config.json`` (model config, head, vocabulary hash, tokenizer settings, what it was trained on), ``vocab.tsv`` and a
``README.md`` model card. There is no pickle in a release: weights are safetensors, and :func:`load_pretrained`
refuses ``.bin``/``.pt``/``.ckpt`` files. torch is imported inside the functions, so ``fm --help`` and ``import fm``
stay fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fm.ckpt_meta import CKPT_KEY
from fm.data.schema import MANIFEST_NAME, VOCAB_NAME, load_manifest
from fm.data.vocab import GeneVocab
from fm.io import atomic_dir

if TYPE_CHECKING:
    import torch

    from fm.heads.base import Head
    from fm.model.zorro import EncoderOutput, ZorroEncoder

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
RELEASE_FORMAT = "fm-release"  # config.json field "format"
RELEASE_VERSION = 1  # config.json field "format_version"; a loader reads versions up to its own
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PREFIXES = ("encoder.", "head.")  # state-dict namespaces of the encoder and of a fine-tuned head
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # a Hugging Face Hub repository id: owner/name


class ReleaseError(ValueError):
    """A checkpoint cannot be exported, or a release folder is malformed (the message names the file and key)."""


@dataclass
class Pretrained:
    """A loaded release: the encoder (None for a baseline), the head (None for a pretrained encoder), the vocabulary
    and config.json's content."""

    encoder: ZorroEncoder | None
    head: Head | None
    vocab: GeneVocab
    config: dict[str, Any]
    path: Path

    @property
    def head_name(self) -> str | None:
        return self.config["head"]["name"] if self.config.get("head") else None

    @property
    def device(self) -> torch.device:
        return next((self.encoder or self.head).parameters()).device

    def to(self, device: str | torch.device) -> Pretrained:
        for module in (self.encoder, self.head):
            if module is not None:
                module.to(device)
        return self

    def encode(self, batch: dict) -> EncoderOutput:
        """The encoder's output on a batch in the collator's layout (fm.keys), moved to the model's device."""
        import torch

        if self.encoder is None:
            raise ReleaseError(f"{self.path}: a {self.head_name} baseline release has no encoder to encode with")
        with torch.inference_mode():
            return self.encoder({k: v.to(self.device) for k, v in batch.items()})


# --- export ----------------------------------------------------------------------------------------------------------
def read_training_checkpoint(path: Path) -> dict:
    """A Lightning checkpoint file, or a DeepSpeed ZeRO folder consolidated to one fp32 checkpoint first."""
    from fm.ckpt_io import load_training_checkpoint

    # a training checkpoint holds optimizer and loop state (pickled); it is the user's own file, and exporting
    # it is how that pickle is left behind
    ckpt = load_training_checkpoint(path)
    meta = ckpt.get(CKPT_KEY) if isinstance(ckpt, dict) else None
    # an encoder's checkpoint records its model config; a baseline's (no encoder) its head and the head's config
    if not meta or not ("model_config" in meta or ("head" in meta and "head_config" in meta)):
        raise ReleaseError(f"{path}: not an fm training checkpoint (no '{CKPT_KEY}.model_config' entry, nor a "
                           f"baseline's '{CKPT_KEY}.head')")
    return ckpt


def release_weights(ckpt: dict, source: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The encoder's (and a fine-tuned head's) weights, namespaced, and the head's ``{name, config}``."""
    meta = ckpt[CKPT_KEY]
    head_name = meta.get("head")  # only fine-tuning and baseline checkpoints name a head; pretraining's is not released
    has_encoder = "model_config" in meta
    prefixes = tuple(p for p, kept in zip(PREFIXES, (has_encoder, bool(head_name)), strict=True) if kept)
    # clone: safetensors refuses tensors that share storage
    state = {k: v.detach().cpu().contiguous().clone() for k, v in ckpt.get("state_dict", {}).items()
             if k.startswith(prefixes)}
    for prefix in prefixes:
        if not any(k.startswith(prefix) for k in state):
            raise ReleaseError(f"{source}: state_dict has no '{prefix}*' weights")
    if not head_name:
        return state, None
    head_hp = dict(ckpt.get("hyper_parameters", {}).get("head") or {})
    if head_hp.pop("name", head_name) != head_name:
        raise ReleaseError(f"{source}: hyper_parameters.head.name differs from {CKPT_KEY}.head={head_name!r}")
    return state, {"name": head_name, "config": head_hp}


def release_vocab(ckpt: dict, source: Path, vocab_path: str | os.PathLike | None) -> GeneVocab:
    """The training corpus's vocabulary (``vocab_path``, else the corpus in the checkpoint), its hash checked."""
    meta = ckpt[CKPT_KEY]
    expected = meta.get("vocab_hash")
    if not expected:
        raise ReleaseError(f"{source}: {CKPT_KEY}.vocab_hash is empty; a release needs the vocabulary it embeds")
    if vocab_path is None:
        corpus = ckpt.get("datamodule_hyper_parameters", {}).get("corpus")
        if corpus is None:
            raise ReleaseError(f"{source}: records no training corpus; pass --vocab PATH (the corpus's vocab.tsv)")
        vocab_path = Path(corpus) / VOCAB_NAME
        if not vocab_path.is_file():
            raise FileNotFoundError(f"{vocab_path}: the vocabulary of the corpus recorded in {source} is missing; "
                                    "pass --vocab PATH")
    vocab = GeneVocab.load(vocab_path)
    if vocab.hash != expected:
        raise ReleaseError(f"{vocab_path}: vocabulary hash {vocab.hash[:12]}... differs from {source}'s "
                           f"{CKPT_KEY}.vocab_hash {expected[:12]}...; pass the training corpus's vocab.tsv")
    # a baseline models the vocabulary's genes as its n_genes
    n_rows = meta["model_config"]["vocab_size"] if "model_config" in meta else meta["head_config"].get("n_genes")
    if n_rows is not None and len(vocab) != n_rows:
        raise ReleaseError(f"{vocab_path}: {len(vocab)} genes but the model embeds vocab_size={n_rows}")
    return vocab


def release_config(ckpt: dict, source: Path, head: dict | None, vocab: GeneVocab) -> dict[str, Any]:
    """config.json's content: what the loader needs, and what the model card reports."""
    from fm import __version__
    from fm.data.tokenize import TokenizerConfig

    data_hp = ckpt.get("datamodule_hyper_parameters") or {}
    tokenizer = {f.name: data_hp[f.name] for f in fields(TokenizerConfig) if f.name in data_hp} or None
    corpus = data_hp.get("corpus")
    datasets = None
    if corpus is not None and (Path(corpus) / MANIFEST_NAME).is_file():
        datasets = [{"dataset_id": d.dataset_id, "source": d.source, "n_cells": d.n_cells_out,
                     "n_genes_matched": d.n_genes_matched} for d in load_manifest(corpus, check_vocab=False).datasets]
    return {
        "format": RELEASE_FORMAT,
        "format_version": RELEASE_VERSION,
        "fm_version": __version__,
        "task": ("finetune" if head else "pretrain") if "model_config" in ckpt[CKPT_KEY] else "baseline",
        "model": ckpt[CKPT_KEY].get("model_config"),  # None: a baseline, no encoder
        "head": head,
        "vocab_hash": vocab.hash,
        "n_genes": len(vocab),
        "tokenizer": tokenizer,
        "neighbourhood": data_hp.get("neighbourhood"),  # the moments the model saw (None: none); fm predict's
        "training": {
            "checkpoint": str(source),
            "global_step": ckpt.get("global_step"),
            "epoch": ckpt.get("epoch"),
            "corpus": corpus,
            "datasets": datasets,
            "finetune": ckpt.get("hyper_parameters", {}).get("finetune") if head else None,
        },
    }


def model_card(config: dict[str, Any]) -> str:
    """README.md of a release: what it is, its config, the data it was trained on as recorded, how to load it."""
    m, head, train = config["model"], config["head"], config["training"]
    what = (f"A `{head['name']}` baseline (no encoder)" if m is None
            else f"A Zorro encoder fine-tuned with a `{head['name']}` head" if head
            else "A contrastively pretrained Zorro encoder (no decoder head)")
    lines = [
        "# fm release", "",
        f"{what}: a foundation model for RNA velocity that reads spliced and unspliced counts as two "
        f"modalities of one cell. Exported by fm {config['fm_version']} (release format {config['format_version']}).",
        "", "## Model", "",
    ]
    if m is not None:
        lines += [f"- width {m['d_model']}, depth {m['depth']}, {m['n_heads']} heads, {m['n_fusion']} fusion tokens, "
                  f"{m['norm']}, {m['mlp']} MLP, {m['pooling']} pooling, {m['value_encoding']} values",
                  f"- attention backend at training: `{m['attention']}` (any backend loads these weights)"]
    lines.append(f"- vocabulary: {config['n_genes']} genes (`vocab.tsv`, sha256 `{config['vocab_hash']}`)")
    if head:
        lines.append(f"- head `{head['name']}`: " + ", ".join(f"{k}={v}" for k, v in head["config"].items()))
    if config["tokenizer"]:
        lines.append("- tokenizer: " + ", ".join(f"{k}={v}" for k, v in config["tokenizer"].items()))
    lines += ["", "## Training data (as recorded in the checkpoint)", "",
              f"- checkpoint `{train['checkpoint']}`, step {train['global_step']}, epoch {train['epoch']}",
              f"- corpus `{train['corpus']}`"]
    for d in train["datasets"] or []:
        lines.append(f"  - `{d['dataset_id']}` from `{d['source']}`: {d['n_cells']} cells, "
                     f"{d['n_genes_matched']} genes matched")
    if train["finetune"]:
        lines.append("- fine-tuning: " + ", ".join(f"{k}={v}" for k, v in train["finetune"].items()))
    lines += ["", "## Load", "", "```python", "import fm", "",
              'model = fm.load_pretrained("path/to/this/folder", attention="sdpa", device="cpu")',
              "out = model.encode(batch)  # batch in the collator's layout (fm.keys)", "```", "",
              "Files: `model.safetensors`, `config.json`, `vocab.tsv`, this card; see fm's docs/RELEASE.md.", ""]
    return "\n".join(lines)


def _is_release(folder: Path) -> bool:
    try:
        return json.loads((folder / CONFIG_NAME).read_text()).get("format") == RELEASE_FORMAT
    except (OSError, ValueError):
        return False


def export(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike,
           vocab: str | os.PathLike | None = None) -> Path:
    """Write a release folder from a training checkpoint (PretrainTask or FinetuneTask; file or ZeRO folder).

    The folder is written under a temporary name next to ``out_dir``, loaded back with :func:`load_pretrained`,
    and only then renamed into place: a failure leaves no half-written folder and keeps an existing release.

    Args:
        ckpt_path: a Lightning ``.ckpt`` file or a DeepSpeed ZeRO checkpoint folder.
        out_dir: the release folder (created; an existing release there is replaced).
        vocab: the training corpus's vocab.tsv (default: the corpus recorded in the checkpoint).
    Returns:
        ``out_dir`` as a Path.
    """
    from safetensors.torch import save_file

    source, out = Path(ckpt_path), Path(out_dir)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _is_release(out))):
        raise ReleaseError(f"{out}: exists and is not an fm release folder; will not replace it")
    ckpt = read_training_checkpoint(source)
    state, head = release_weights(ckpt, source)
    gene_vocab = release_vocab(ckpt, source, vocab)
    config = release_config(ckpt, source, head, gene_vocab)
    del ckpt

    with atomic_dir(out) as tmp:
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt", "fm_format": RELEASE_FORMAT})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        gene_vocab.save(tmp / VOCAB_NAME)
        (tmp / CARD_NAME).write_text(model_card(config))
        load_pretrained(tmp)  # the release must load before it replaces anything
    log.info("exported %s -> %s (%d tensors%s)", source, out, len(state),
             f", {head['name']} head" if head else "")
    return out


# --- load ------------------------------------------------------------------------------------------------------------
def _refuse_pickle(path: Path) -> None:
    raise ReleaseError(
        f"{path}: pickle weights are not loaded (unpickling can run code). Convert a training checkpoint with "
        f"`fm export CKPT --out DIR`, or, if you trust the file, read it yourself with "
        f"torch.load(path, weights_only=True)"
    )


def resolve_release(path_or_repo_id: str | os.PathLike, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> Path:
    """The local folder of a release: the path itself, or a Hub repository's snapshot (downloaded or cached)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(path)
        raise ReleaseError(f"{path}: a file; load_pretrained takes a release folder ({WEIGHTS_NAME}, {CONFIG_NAME}, "
                           f"{VOCAB_NAME})")
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    if not REPO_ID.match(name):
        raise FileNotFoundError(f"{name}: no such release folder (nor a Hub repository id owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only))
    except Exception as e:  # the Hub's errors (offline, not found, gated) -> one message naming both readings
        raise FileNotFoundError(f"{name}: no such local folder, and the Hub repository could not be fetched "
                                f"({type(e).__name__}: {e})") from e


def read_release_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ReleaseError(f"{path}: missing; not an fm release folder (fm export writes one)")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ReleaseError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict) or config.get("format") != RELEASE_FORMAT:
        raise ReleaseError(f"{path}: field 'format' must be {RELEASE_FORMAT!r}")
    version = config.get("format_version")
    if not isinstance(version, int) or version > RELEASE_VERSION:
        raise ReleaseError(f"{path}: field 'format_version' is {version!r}; this fm reads up to {RELEASE_VERSION}")
    for key in ("model", "vocab_hash", "head"):
        if key not in config:
            raise ReleaseError(f"{path}: field {key!r} missing")
    return config


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_NAME
    if not path.is_file():
        pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            _refuse_pickle(pickles[0])
        raise ReleaseError(f"{path}: missing; not an fm release folder (fm export writes one)")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise ReleaseError(f"{path}: unreadable safetensors file ({e}); truncated or corrupt? "
                           "download or export it again") from e


def check_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> None:
    """Raise ReleaseError naming the file and keys when the weights' keys or shapes differ from the model's."""

    def some(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")

    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = ([f"missing keys {some(missing)}"] if missing else []) + (
            [f"unexpected keys {some(unexpected)}"] if unexpected else [])
        raise ReleaseError(f"{path}: {'; '.join(parts)} (the model described by {CONFIG_NAME} differs)")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ReleaseError(f"{path}: key {key!r} has shape {tuple(tensor.shape)}, the model described by "
                               f"{CONFIG_NAME} expects {tuple(expected[key].shape)}")


def load_pretrained(path_or_repo_id: str | os.PathLike, *, attention: str | None = None,
                    device: str | torch.device = "cpu", revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> Pretrained:
    """Load a release folder (or a Hugging Face Hub repository id) with strict checks; eval mode.

    Args:
        path_or_repo_id: a release folder written by :func:`export`, or ``owner/name`` on the Hub.
        attention: an attention backend (sdpa | flex | blocks | flash) instead of the one recorded; nothing else
            in the model config can be overridden (the weights do not depend on the backend).
        device: where the model goes (``cpu``, ``cuda``, ``cuda:1``).
        revision, cache_dir, local_files_only: passed to ``huggingface_hub.snapshot_download`` for a repository id.
    Raises:
        ReleaseError: missing/unexpected keys, a shape mismatch, a vocabulary whose hash differs from config.json's,
            an unreadable (truncated) safetensors file, or pickle weights; the message names the file and key.
    """
    import torch

    from fm.baselines.registry import BASELINES
    from fm.heads.registry import HEADS
    from fm.model.config import ZorroConfig, model_width
    from fm.model.zorro import ZorroEncoder

    folder = resolve_release(path_or_repo_id, revision, cache_dir, local_files_only)
    config = read_release_config(folder)
    head = config["head"]
    model_cfg = None  # a baseline's release: no encoder, the head alone
    if config["model"] is not None:
        try:
            model_cfg = ZorroConfig.from_dict({**config["model"], **({"attention": attention} if attention else {})})
        except (TypeError, ValueError) as e:
            raise ReleaseError(f"{folder / CONFIG_NAME}: field 'model': {e}") from e
    elif not head:
        raise ReleaseError(f"{folder / CONFIG_NAME}: fields 'model' and 'head' are both null; nothing to load")
    vocab = GeneVocab.load(folder / VOCAB_NAME)
    if vocab.hash != config["vocab_hash"]:
        raise ReleaseError(f"{folder / VOCAB_NAME}: hash {vocab.hash[:12]}... differs from {CONFIG_NAME} field "
                           f"'vocab_hash' {str(config['vocab_hash'])[:12]}...; the file was changed or is another "
                           "model's vocabulary")
    # a baseline models the vocabulary's genes as its n_genes
    n_rows = model_cfg.vocab_size if model_cfg is not None else (head.get("config") or {}).get("n_genes")
    if n_rows is not None and len(vocab) != n_rows:
        raise ReleaseError(f"{folder / VOCAB_NAME}: {len(vocab)} genes, {CONFIG_NAME} "
                           f"{'model.vocab_size' if model_cfg is not None else 'head.config.n_genes'} is {n_rows}")

    modules = torch.nn.ModuleDict({"encoder": ZorroEncoder(model_cfg)} if model_cfg is not None else {})
    if head:
        registry = HEADS if model_cfg is not None else BASELINES  # a head on an encoder, or a baseline alone
        if head.get("name") not in registry:
            raise ReleaseError(f"{folder / CONFIG_NAME}: field 'head.name' must be one of {tuple(registry)}"
                               f"{'' if model_cfg is not None else ' (a release without a model)'}, "
                               f"got {head.get('name')!r}")
        config_cls, head_cls = registry[head["name"]]
        try:
            head_config = config_cls(**head.get("config", {}))
        except (TypeError, ValueError) as e:
            raise ReleaseError(f"{folder / CONFIG_NAME}: field 'head.config': {e}") from e
        modules["head"] = (head_cls(model_width(model_cfg), model_cfg.vocab_size, head_config)
                           if model_cfg is not None else head_cls(head_config))
    state = read_weights(folder)
    check_state(state, modules.state_dict(), folder / WEIGHTS_NAME)
    modules.load_state_dict(state, strict=True)
    modules.to(device).eval()
    return Pretrained(modules["encoder"] if model_cfg is not None else None, modules["head"] if head else None,
                      vocab, config, folder)


# --- command line ----------------------------------------------------------------------------------------------------
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="a training checkpoint -> a release folder (safetensors, config, vocab, model card)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CKPT", help="a Lightning .ckpt file or a DeepSpeed ZeRO checkpoint folder")
    p.add_argument("--out", required=True, help="release folder (an existing release there is replaced)")
    p.add_argument("--vocab", help="the training corpus's vocab.tsv (default: the corpus the checkpoint records)")
    p.set_defaults(func=lambda a: export(a.checkpoint, a.out, vocab=a.vocab) and 0)
    return p
