"""Hugging Face export (`hrm-mega export-hf`): an hrm-mega model -> a directory that transformers loads.

Two formats; `auto` picks the first that is exact:
- gemma3: an HRMGemma that computes exactly Gemma 3 (h_cycles = l_cycles = 1, or every gate zero; see
  hf_gemma.plain_gemma3_blocker) becomes a plain Gemma3ForCausalLM: config.json (model_type
  gemma3_text), generation_config.json and model.safetensors; with model.vision, a
  Gemma3ForConditionalGeneration (model_type gemma3, the SigLIP tower and projector included) plus
  preprocessor_config.json (Gemma 3's image processor at model.vision.image_size). HRMGemma's own
  tensors (gates, halting heads, value head) have no place in it and are left out.
- remote: any other HRMGemma, and every RecursiveReasoner, ships its own modeling code (convert/remote):
  config.json with an auto_map, hrm-mega's model sources and a thin wrapper, and model.safetensors
  with every tensor of the state dict under `model.`. It loads with trust_remote_code=True.
Weights are sharded (model-0000k-of-0000n.safetensors + index) past max_shard_size, as transformers does.

An HRMGemma export also carries the tokenizer when there is one: tokenizer.json and
tokenizer_config.json built from the SentencePiece model (so AutoTokenizer loads it offline, without
sentencepiece), plus the tokenizer.model itself; it pads on the left, as Gemma's tokenizer does. With
model.vision it carries Gemma 3's image processor (preprocessor_config.json: the one import-hf kept, or
the given settings, e.g. the training data's pan-and-scan), and, when the tokenizer holds the image
tokens (model.vision's boi/eoi/image ids; the image token may be the one id past the SentencePiece
pieces, as in Gemma 3), processor_config.json, so that AutoProcessor loads a Gemma3Processor offline,
for either format. The export is written to a temporary sibling directory and renamed into place at
the end, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hrm_mega.checkpoint.integrity import write_checksums
from hrm_mega.config import Config
from hrm_mega.config.model import VisionConfig
from hrm_mega.convert import remote
from hrm_mega.convert.hf_gemma import (
    IMAGE_PROCESSOR_FILE,
    hf_config_from,
    hf_multimodal_config_from,
    hf_multimodal_state_dict,
    plain_gemma3_blocker,
    to_hf_state_dict,
)
from hrm_mega.data.images import ImageProcessing
from hrm_mega.data.shards import TOKENIZER_FILE
from hrm_mega.models.lm import is_hrm_only

FORMATS = ("auto", "gemma3", "remote")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Without a tokenizer: Gemma's special ids, which hrm-mega's text data prep uses too.
GEMMA_SPECIAL_IDS = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
UNREACHABLE_SCORE = -1e9  # for pieces SentencePiece never produces from text (control, byte, unused)


class ExportError(ValueError):
    """A model or tokenizer that cannot be exported as asked; the message is one line."""


@dataclass
class ExportReport:
    out: Path
    format: str  # "gemma3" or "remote"
    architecture: str  # the class transformers builds
    tokenizer: Path | None  # the SentencePiece model the tokenizer files came from
    notes: list[str] = field(default_factory=list)


def export_hf(
    model: torch.nn.Module,
    config: Config,
    out_dir: str | Path,
    *,
    tokenizer: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    format: str = "auto",
    max_shard_size: int | str = "5GB",
    image_processor: ImageProcessing | str | Path | None = None,
) -> ExportReport:
    """Writes the export of `model` (built from `config`, e.g. by checkpoint.consolidate.load_model) to
    out_dir, which must not exist or be empty. tokenizer: a SentencePiece .model file (HRMGemma only).
    image_processor (a model with images): a Gemma 3 preprocessor_config.json to ship as it is, or the
    preprocessing settings to write one from; default Gemma 3's at model.vision.image_size."""
    if format not in FORMATS:
        raise ExportError(f"format={format!r} must be one of {', '.join(FORMATS)}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(
            f"{out} already exists and is not an empty directory; choose a new output directory"
        )
    family = config.model.family
    if tokenizer is not None and family != "hrm_gemma":
        raise ExportError(
            f"--tokenizer applies to language models; model.family={family} has no text tokenizer"
        )
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    blocker = (
        plain_gemma3_blocker(state, config.model)
        if family == "hrm_gemma"
        else "a RecursiveReasoner has no transformers architecture"
    )
    if format == "gemma3" and blocker is not None:
        raise ExportError(f"cannot export as a plain Gemma3ForCausalLM: {blocker}; use --format remote")
    plain = format != "remote" and blocker is None

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        special = dict(GEMMA_SPECIAL_IDS) if family == "hrm_gemma" else {}
        vision = getattr(config.model, "vision", None)
        image_tokens = None
        if tokenizer is not None:
            special, image_tokens = export_tokenizer(
                tokenizer, tmp, config.model.vocab_size, config.model.max_position, vision
            )
        if plain:
            report = _export_gemma3(state, config, tmp, dtype, special, max_shard_size)
        else:
            report = _export_remote(state, config, tmp, dtype, special, max_shard_size)
        if vision is not None:
            save_image_processor(vision, tmp, image_processor)
            if image_tokens:
                processor = {
                    "processor_class": "Gemma3Processor",
                    "image_seq_length": vision.mm_tokens_per_image,
                }
                (tmp / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
            elif tokenizer is not None:
                report.notes.append(
                    "no processor_config.json: the tokenizer lacks model.vision's image tokens (boi/eoi/image ids)"
                )
        write_checksums(tmp)  # import-hf checks them; transformers ignores the file
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.out, report.tokenizer = out, None if tokenizer is None else Path(tokenizer)
    return report


def _export_gemma3(
    state: dict[str, torch.Tensor],
    config: Config,
    out: Path,
    dtype: torch.dtype,
    special: dict[str, int | None],
    max_shard_size: int | str,
) -> ExportReport:
    from transformers import GenerationConfig

    single = dataclasses.replace(config.model, h_cycles=1, l_cycles=1)  # the same function (zero gates)
    ours = {k: v for k, v in state.items() if not is_hrm_only(k)}
    architecture = "Gemma3ForCausalLM" if single.vision is None else "Gemma3ForConditionalGeneration"
    if single.vision is None:
        hf_state, hf_config, head = to_hf_state_dict(ours, single), hf_config_from(single), "lm_head.weight"
    else:
        hf_state, hf_config = hf_multimodal_state_dict(ours, single), hf_multimodal_config_from(single)
        head = "language_model.lm_head.weight"
    if single.tie_embeddings:
        del hf_state[head]  # the tied head is the embedding; transformers re-ties it on load
    save_weights(hf_state, out, dtype, max_shard_size)
    hf_config.architectures = [architecture]
    hf_config.dtype = dtype
    for name, value in special.items():
        setattr(hf_config, name, value)
        if single.vision is not None:
            setattr(hf_config.text_config, name, value)
    hf_config.save_pretrained(out)
    GenerationConfig(**special).save_pretrained(out)
    notes = []
    dropped = [k for k, v in state.items() if is_hrm_only(k) and bool(v.any())]
    if dropped:
        notes.append(
            f"left out {len(dropped)} nonzero HRM-only tensors that Gemma 3 has no place for (e.g. {dropped[0]}); "
            "--format remote keeps them"
        )
    return ExportReport(out, "gemma3", architecture, None, notes)


def save_image_processor(
    vision: VisionConfig, out: Path, settings: ImageProcessing | str | Path | None = None
) -> None:
    """preprocessor_config.json: a Gemma 3 image processor config file copied as it is (import-hf keeps
    the original's), or Gemma3ImageProcessorPil with `settings` (what hrm_mega/data/images.py computes
    with them; default: Gemma 3's, pan-and-scan off) at the vision tower's input size."""
    from transformers import Gemma3ImageProcessorPil

    side = vision.image_size
    if isinstance(settings, (str, Path)):
        path = Path(settings)
        try:
            size = Gemma3ImageProcessorPil.from_json_file(path).size
        except Exception as e:  # a missing, non-JSON or foreign file: one line naming it
            reason = " ".join(str(e).split())
            raise ExportError(f"{path}: not a Gemma 3 image processor config ({reason})") from None
        if (size.height, size.width) != (side, side):
            raise ExportError(
                f"{path} resizes images to {size.height} x {size.width}, but the vision tower takes "
                f"{side} x {side} (model.vision.image_size)"
            )
        shutil.copyfile(path, out / IMAGE_PROCESSOR_FILE)
        return
    p = settings or ImageProcessing.for_model(vision)
    if p.size != side:
        raise ExportError(
            f"the image preprocessing resizes to {p.size} px, but model.vision.image_size={side}"
        )
    Gemma3ImageProcessorPil(
        size={"height": side, "width": side}, image_mean=list(p.mean), image_std=list(p.std),
        do_pan_and_scan=p.pan_and_scan, pan_and_scan_min_crop_size=p.min_crop_size,
        pan_and_scan_max_num_crops=p.max_crops, pan_and_scan_min_ratio_to_activate=p.min_ratio,
    ).save_pretrained(out)  # fmt: skip


def _export_remote(
    state: dict[str, torch.Tensor],
    config: Config,
    out: Path,
    dtype: torch.dtype,
    special: dict[str, int | None],
    max_shard_size: int | str,
) -> ExportReport:
    from transformers import GenerationConfig

    from hrm_mega.convert.remote.configuration_hrm_mega import HRMMegaConfig

    family = config.model.family
    shipped = remote.ship_model_code(out)
    architecture = remote.LM_CLASS if family == "hrm_gemma" else remote.PUZZLE_CLASS
    save_weights({f"model.{k}": v for k, v in state.items()}, out, dtype, max_shard_size)
    hf_config = HRMMegaConfig(
        hrm_model=dataclasses.asdict(config.model), architectures=[architecture],
        auto_map=remote.auto_map(family), dtype=dtype, **special,
    )  # fmt: skip
    hf_config.save_pretrained(out)
    if family == "hrm_gemma":
        # use_cache: the wrapper's generate() decodes against hrm-mega's KV cache (modeling_hrm_mega.py)
        GenerationConfig(**special, use_cache=True).save_pretrained(out)
    notes = [
        f"{name} imports {', '.join(packages)} inside a function (not at load); from the Hugging Face Hub, "
        "unlike from a directory, transformers loads the export only where that is installed"
        for name, packages in remote.hub_only_requirements(shipped).items()
    ]
    return ExportReport(out, "remote", architecture, None, notes)


def save_weights(
    state: dict[str, torch.Tensor], out: Path, dtype: torch.dtype, max_shard_size: int | str = "5GB"
) -> list[Path]:
    """Floating tensors cast to dtype, written as transformers writes them: one model.safetensors, or
    shards plus model.safetensors.index.json past max_shard_size."""
    from huggingface_hub import split_torch_state_dict_into_shards

    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    files = []
    for filename, names in split.filename_to_tensors.items():
        files.append(out / filename)
        save_file({n: tensors[n] for n in names}, files[-1], metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def export_tokenizer(
    spm_model: str | Path,
    out: Path,
    vocab_size: int,
    max_length: int | None = None,
    vision: VisionConfig | None = None,
) -> tuple[dict[str, int | None], dict[str, str]]:
    """Writes tokenizer.json + tokenizer_config.json (a transformers fast tokenizer that encodes like the
    SentencePiece model and prepends <bos>, as the text data prep does) and a copy of the .model.

    With `vision`, model.vision's boi/eoi/image ids become the named special tokens Gemma3Processor
    reads (boi_token, eoi_token, image_token) when the SentencePiece model has them; the image token
    may also be the one id right after its pieces (Gemma 3's <image_soft_token>), added here.
    Returns the special token ids for the configs (bos_token_id, eos_token_id, pad_token_id) and the
    named image tokens ({} when there are none)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    path = Path(spm_model)
    if not path.is_file():
        raise ExportError(f"--tokenizer {path}: no such file (expected a SentencePiece tokenizer.model)")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception:  # protobuf's DecodeError, or anything a corrupt file provokes
        raise ExportError(f"--tokenizer {path}: not a SentencePiece model (it does not parse)") from None
    if not proto.pieces or proto.trainer_spec.model_type not in (1, 2):
        raise ExportError(f"--tokenizer {path}: only SentencePiece unigram and BPE models are supported")
    if len(proto.pieces) > vocab_size:
        raise ExportError(
            f"--tokenizer {path}: {len(proto.pieces)} pieces do not fit model.vocab_size={vocab_size}; "
            "is it the tokenizer this model was trained with?"
        )
    normal, unknown, control, user_defined = 1, 2, 3, 4
    if proto.trainer_spec.model_type == 1:
        # SentencePiece matches only normal and user-defined pieces in text; make the rest unreachable.
        vocab = [
            (p.piece, p.score if p.type in (normal, user_defined) else UNREACHABLE_SCORE)
            for p in proto.pieces
        ]
    else:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    backend.add_special_tokens(
        [
            AddedToken(p.piece, special=True, normalized=False)
            for p in proto.pieces
            if p.type in (unknown, control)
        ]
    )
    named = _image_tokens(proto, backend, vision) if vision is not None else {}
    spec = proto.trainer_spec
    ids = {"bos": spec.bos_id, "eos": spec.eos_id, "pad": spec.pad_id, "unk": spec.unk_id}
    pieces = {name: proto.pieces[i].piece for name, i in ids.items() if 0 <= i < len(proto.pieces)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, **{f"{name}_token": piece for name, piece in pieces.items()},
        add_bos_token="bos" in pieces, add_eos_token=False, clean_up_tokenization_spaces=False, padding_side="left",
        model_max_length=max_length or int(1e30), **({"extra_special_tokens": named} if named else {}),
    )  # fmt: skip
    tokenizer.save_pretrained(out)
    shutil.copyfile(path, out / TOKENIZER_FILE)
    special = {f"{name}_token_id": ids[name] if name in pieces else None for name in ("bos", "eos", "pad")}
    return special, named


IMAGE_TOKEN_PIECE = "<image_soft_token>"  # Gemma 3's name for the image placeholder


def _image_tokens(proto: Any, backend: Any, vision: VisionConfig) -> dict[str, str]:
    """{boi_token, eoi_token, image_token: piece} for model.vision's ids, each made an unsplittable special
    token of `backend`; {} (and nothing added) unless all three have a piece."""
    from tokenizers import AddedToken

    wanted = {
        "boi_token": vision.boi_token_id,
        "eoi_token": vision.eoi_token_id,
        "image_token": vision.image_token_id,
    }
    n = len(proto.pieces)
    named = {name: proto.pieces[i].piece for name, i in wanted.items() if i < n}
    if vision.image_token_id == n and IMAGE_TOKEN_PIECE not in {p.piece for p in proto.pieces}:
        named["image_token"] = IMAGE_TOKEN_PIECE  # appended: it gets id n
    if len(named) < len(wanted):
        return {}
    backend.add_special_tokens(
        [AddedToken(piece, special=True, normalized=False) for piece in named.values()]
    )
    if backend.token_to_id(named["image_token"]) != vision.image_token_id:
        raise ExportError(
            f"the tokenizer gave {named['image_token']} another id than {vision.image_token_id}"
        )
    return named
