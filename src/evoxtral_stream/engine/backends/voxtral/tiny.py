"""Tiny random Voxtral checkpoints and LoRA adapters, for tests and benchmarks.

Nothing here downloads: the tokenizer is derived from the Tekken file that
ships inside the mistral-common wheel (version bumped to v7, the Voxtral
special tokens and an audio block added), the model has random weights.
The audio encoder keeps the real geometry that matters (128 mel bins, 3000
frames per 30 s window, ``intermediate_size = 4 * hidden_size`` so four
encoder frames stack into one of 375 audio tokens per window).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .adapter import OLD_TO_NEW_PREFIXES, PEFT_PREFIX

__all__ = [
    "LORA_TARGETS",
    "build_checkpoint",
    "lora_deltas",
    "tiny_voxtral_config",
    "write_feature_extractor",
    "write_lora_adapter",
    "write_tekken",
]

LORA_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "linear_1",
    "linear_2",
)
"""The Evoxtral adapter's plain target names (they also match the audio
tower's self-attention q/k/v)."""

_NAMED_SPECIALS = {
    0: "<unk>",
    1: "<s>",
    2: "</s>",
    3: "[INST]",
    4: "[/INST]",
    5: "[AVAILABLE_TOOLS]",
    6: "[/AVAILABLE_TOOLS]",
    7: "[TOOL_RESULTS]",
    8: "[/TOOL_RESULTS]",
    9: "[TOOL_CALLS]",
    10: "[IMG]",
    11: "<pad>",
    12: "[IMG_BREAK]",
    13: "[IMG_END]",
    14: "[PREFIX]",
    15: "[MIDDLE]",
    16: "[SUFFIX]",
    17: "[SYSTEM_PROMPT]",
    18: "[/SYSTEM_PROMPT]",
    19: "[TOOL_CONTENT]",
    24: "[AUDIO]",
    25: "[BEGIN_AUDIO]",
    32: "[ARGS]",
    33: "[CALL_ID]",
    34: "[TRANSCRIBE]",
}


def write_tekken(path: Path) -> Path:
    """Write a Voxtral-style ``tekken.json`` derived from mistral-common's own."""
    import mistral_common

    src = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    data = json.loads(src.read_text("utf-8"))
    data["config"]["version"] = "v7"
    n_special = int(data["config"]["default_num_special_tokens"])
    data["special_tokens"] = [
        {"rank": i, "token_str": _NAMED_SPECIALS.get(i, f"<SPECIAL_{i}>"), "is_control": True}
        for i in range(n_special)
    ]
    data["audio"] = {
        "sampling_rate": 16000,
        "frame_rate": 12.5,
        "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400},
        "chunk_length_s": 30.0,
    }
    path.write_text(json.dumps(data), "utf-8")
    return path


def write_feature_extractor(folder: Path) -> None:
    """Write the ``preprocessor_config.json`` of Voxtral's feature extractor."""
    from transformers import WhisperFeatureExtractor

    extractor: Any = WhisperFeatureExtractor
    extractor(feature_size=128).save_pretrained(str(folder))


def tiny_voxtral_config(*, init_range: float = 0.3, full: bool = False,
                        layers: int | None = None) -> Any:
    """A ``transformers.VoxtralConfig``: tiny, or the full 3B size with ``full``.

    ``layers`` (with ``full``) keeps every full-size width (hidden sizes,
    heads, grouped key/value heads, head size, vocabulary) and cuts both
    towers to that many layers: the real shapes at a CPU's cost.
    The large ``init_range`` makes the random model's greedy output depend
    clearly on the audio, so batching bugs show up as different text.
    """
    from transformers import VoxtralConfig

    if full:
        config: Any = VoxtralConfig(audio_token_id=24)
        if layers is not None:
            if layers < 1:
                raise ValueError(f"layers must be at least 1, not {layers}")
            config.text_config.num_hidden_layers = layers
            config.audio_config.num_hidden_layers = layers
        return config
    text = {
        "vocab_size": 131072,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e8,
        "initializer_range": init_range,
    }
    audio = {
        "hidden_size": 16,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_mel_bins": 128,
        "max_source_positions": 1500,
        "initializer_range": init_range,
    }
    return VoxtralConfig(text_config=text, audio_config=audio, audio_token_id=24)


def build_checkpoint(folder: Path, *, seed: int = 0, init_range: float = 0.3) -> nn.Module:
    """Save a tiny random Voxtral with tokenizer and feature extractor in ``folder``.

    Returns the model (float32, CPU, eval mode).
    """
    from transformers import VoxtralForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model: Any = VoxtralForConditionalGeneration(tiny_voxtral_config(init_range=init_range))
    model.eval()
    model.save_pretrained(str(folder))
    write_tekken(folder / "tekken.json")
    write_feature_extractor(folder)
    return cast(nn.Module, model)


def _old_name(module: str) -> str:
    for old, new in OLD_TO_NEW_PREFIXES:
        if module.startswith(new):
            return old + module[len(new) :]
    return module


def write_lora_adapter(
    model: nn.Module,
    folder: Path,
    *,
    rank: int = 4,
    alpha: int = 8,
    seed: int = 1,
    scale: float = 0.2,
    old_layout: bool = True,
    targets: tuple[str, ...] = LORA_TARGETS,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Write a random LoRA adapter for ``model`` as peft saves it.

    With ``old_layout`` the keys use the transformers 4.5x module paths
    (``language_model.model.*``, ``audio_tower.*``, ``multi_modal_projector.*``),
    as the published Evoxtral adapter does. Returns module name -> (A, B)
    under the current module paths: the ground truth for tests.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    pattern = re.compile(r"(^|\.)(" + "|".join(targets) + r")$")
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.Linear) and pattern.search(name)):
            continue
        a = torch.randn(rank, mod.in_features, generator=gen) * scale
        b = torch.randn(mod.out_features, rank, generator=gen) * scale
        pairs[name] = (a, b)
        saved = _old_name(name) if old_layout else name
        tensors[f"{PEFT_PREFIX}{saved}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{saved}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "mistralai/Voxtral-Mini-3B-2507",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "target_modules": list(targets),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2), "utf-8")
    return pairs


def lora_deltas(
    pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, rank: int, alpha: int
) -> dict[str, torch.Tensor]:
    """Module name -> the weight delta ``B @ A * alpha / rank`` of plain LoRA."""
    return {name: (b @ a) * (alpha / rank) for name, (a, b) in pairs.items()}
