"""Sizes of the zoo's SD components, chosen for two CPU cores.

- Images 32 px; VAE with three encoder blocks (16, 32, 64) = two 2x downsamplings, so latents
  are (4, 8, 8) like SD's (4, 64, 64) at 1/8 scale. `dmm_ray.tiny.tiny_vae_config()`'s default
  two blocks downsample only 2x (32 px -> 16x16 latents, 4x the UNet cost), hence the third
  block; 16 channels at full resolution keep a VAE step at ~0.2-0.3 s for batch 64.
- UNet: `tiny_unet_config()` (blocks 32, 64; cross-attention dim 32; ~0.8M parameters).
- Tokenizer: the CLIP BPE tokenizer of `dmm_ray.tiny` over its default words plus every
  caption word, with `model_max_length=16`: the longest caption is 13 tokens with BOS/EOS, and
  attention over 16 instead of 77 text tokens makes a UNet step ~1.5x cheaper.
- Text encoder: tiny CLIP (2 layers, width 32), trained jointly with the base UNet (it costs
  little next to the UNet and lets the embedding separate the caption words the UNet must
  follow, instead of relying on random projections), then frozen and shared by the teachers,
  except those whose spec says they fine-tune their own (as some real SD fine-tunes do).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from dmm_ray.tiny import DEFAULT_WORDS, SD_SCHEDULE, _bytes_to_unicode, tiny_text_encoder_config, tiny_unet_config, tiny_vae_config

from .scenes import CAPTION_WORDS

TOKENIZER_MAX_LENGTH = 16
VAE_BLOCKS = (16, 32, 64)
UNET_BLOCKS = (32, 64)
CROSS_ATTENTION_DIM = 32


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the adjacent pair of lowest rank."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def build_word_tokenizer(words, model_max_length: int = TOKENIZER_MAX_LENGTH) -> CLIPTokenizer:
    """A CLIP BPE tokenizer in which every word of `words` is exactly one token.

    `dmm_ray.tiny.build_clip_tokenizer` adds each word's left-to-right merge chain, but BPE
    applies the globally lowest-ranked pair first, so an earlier word's merge can pre-empt a
    later word's chain ("la" from "large" splits "black" into b/la/c/k). Here each word's merges
    continue from its segmentation under the merges so far, and the result is verified.
    """
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    seen = set(vocab_list)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    words = list(dict.fromkeys(w.lower() for w in words))
    for word in words:
        symbols = _bpe(word, ranks)
        current = symbols[0]
        for nxt in symbols[1:]:
            if (current, nxt) not in ranks:
                ranks[(current, nxt)] = len(merges)
                merges.append((current, nxt))
            current = current + nxt
            if current not in seen:
                seen.add(current)
                vocab_list.append(current)
    broken = [w for w in words if len(_bpe(w, ranks)) != 1]
    if broken:
        raise RuntimeError(f"tokenizer construction left words split into several tokens: {broken}")
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab_list)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
        return CLIPTokenizer(vocab=str(Path(tmp) / "vocab.json"), merges=str(Path(tmp) / "merges.txt"), model_max_length=model_max_length)


def zoo_tokenizer() -> CLIPTokenizer:
    """Every caption word (and dmm_ray.tiny's default words) is one token."""
    return build_word_tokenizer(list(DEFAULT_WORDS) + list(CAPTION_WORDS))


def zoo_components(seed: int, image_size: int = 32) -> dict:
    """Freshly initialised (seeded) components for `StableDiffusionPipeline(**c)`."""
    tokenizer = zoo_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKL(**tiny_vae_config(block_out_channels=VAE_BLOCKS, sample_size=image_size))
    latent_size = image_size // 2 ** (len(VAE_BLOCKS) - 1)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        **tiny_unet_config(block_out_channels=UNET_BLOCKS, cross_attention_dim=CROSS_ATTENTION_DIM, sample_size=latent_size)
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(tiny_text_encoder_config(len(tokenizer), hidden_size=CROSS_ATTENTION_DIM))
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DPMSolverMultistepScheduler(**SD_SCHEDULE, algorithm_type="dpmsolver++"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """(B, L) int64 ids padded to the tokenizer's max length, exactly as the SD pipeline tokenizes."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
