"""Tiny, seeded, offline Stable Diffusion components (the `get_dummy_components` of dmm-ray).

Everything here is built in code, in well under a second, with the real diffusers /
transformers classes, so every code path that runs on SD1.5 runs unchanged on these.
The tokenizer is a real CLIP BPE tokenizer whose vocabulary is built from a word list,
so `save_pretrained` / `from_pretrained` round-trip offline.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Iterable

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# The words our toy captions are made of; anything else falls back to characters.
DEFAULT_WORDS = (
    "a an the of on in with and small large big tiny one two three four five "
    "red green blue yellow orange purple pink white black gray grey brown cyan "
    "circle square triangle cross ring star stripe stripes dot dots shape shapes "
    "left right top bottom center middle corner background photo painting picture "
    "worst quality low normal lowres watermark nsfw"
).split()

# Same noise schedule as SD1.5, so add_noise / g(x_t, eps) behave like the real thing.
SD_SCHEDULE = dict(num_train_timesteps=1000, steps_offset=1, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet (same table as transformers' CLIP tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


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


def build_clip_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer in which every word of `words` is exactly one token.

    BPE applies the globally lowest-ranked pair first, so naively adding each word's left-to-right
    merge chain lets an earlier word's merge pre-empt a later word's ("la" from "large" would split
    "black" into b/la/c/k). Each word's merges therefore continue from its segmentation under the
    merges so far, and the result is verified. Unknown words still tokenize (into characters),
    exactly like real CLIP on rare words.
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


def tiny_unet_config(
    block_out_channels=(32, 64),
    cross_attention_dim: int = 32,
    sample_size: int = 8,
    latent_channels: int = 4,
    layers_per_block: int = 1,
    attention_head_dim: int = 8,
    norm_num_groups: int = 8,
) -> dict:
    n = len(block_out_channels)
    return dict(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
    )


def tiny_vae_config(block_out_channels=(32, 64), latent_channels: int = 4, sample_size: int = 32, norm_num_groups: int = 8) -> dict:
    n = len(block_out_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
    )


def tiny_text_encoder_config(vocab_size: int, hidden_size: int = 32, max_position_embeddings: int = 77) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        projection_dim=hidden_size,
    )


def tiny_sd_components(seed: int = 0, words: Iterable[str] = DEFAULT_WORDS, **unet_overrides) -> dict:
    """Complete tiny SD1.5-style component set for `StableDiffusionPipeline(**components)`.

    Latents are 4 channels at 1/2 resolution (two VAE blocks = one 2x downsampling), e.g. 32 px
    images -> (4, 16, 16); the toy zoo uses three blocks for 4x.
    """
    tokenizer = build_clip_tokenizer(words)
    unet_config = tiny_unet_config(**unet_overrides)
    return sd_components(
        unet_config,
        tiny_vae_config(latent_channels=unet_config["in_channels"]),
        tiny_text_encoder_config(len(tokenizer), hidden_size=unet_overrides.get("cross_attention_dim", 32)),
        tokenizer,
        seed,
    )


def sd_components(unet_config: dict, vae_config: dict, text_config: CLIPTextConfig, tokenizer: CLIPTokenizer, seed: int = 0) -> dict:
    """An SD1.5-style component set for `StableDiffusionPipeline(**components)` from its configs, with
    random weights (UNet, VAE and text encoder from `seed`, `seed + 1`, `seed + 2`) and the paper's
    DPM-Solver++ scheduler: the tiny set above, and full-size ones (`dmm_ray.random_weights`)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**vae_config)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_config)
    return dict(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=DPMSolverMultistepScheduler(**SD_SCHEDULE, algorithm_type="dpmsolver++"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def training_noise_scheduler() -> DDPMScheduler:
    """The DDPM schedule teachers were trained with (x_t = sqrt(a_t) x0 + sqrt(1-a_t) eps)."""
    return DDPMScheduler(**SD_SCHEDULE)


def tiny_sdxl_unet_config(text_hidden_2: int = 32, **overrides) -> dict:
    """A tiny SDXL-style UNet config (text_time add-embedding, two text encoders' width: 32 + text_hidden_2)."""
    config = tiny_unet_config(**overrides)
    config.update(
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + text_hidden_2,
        transformer_layers_per_block=1,
        cross_attention_dim=32 + text_hidden_2,
        use_linear_projection=True,
    )
    return config


def tiny_sdxl_components(seed: int = 0, words: Iterable[str] = DEFAULT_WORDS, text_hidden_2: int = 32) -> dict:
    """Complete tiny SDXL-style component set for `StableDiffusionXLPipeline(**components)`: two text
    encoders (hidden 32 and `text_hidden_2`, concatenated to the UNet's cross-attention width), the
    second with a projection whose pooled output feeds SDXL's text_time embedding together with the
    size ids. Give the two encoders different widths (as real SDXL's 768 / 1280) when the pipeline must
    go through diffusers' single-file loader, which tells the two apart by their width."""
    tokenizer = build_clip_tokenizer(words)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_sdxl_unet_config(text_hidden_2=text_hidden_2))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**tiny_vae_config(latent_channels=unet.config.in_channels))
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(tiny_text_encoder_config(len(tokenizer)))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_encoder_config(len(tokenizer), hidden_size=text_hidden_2))
    return dict(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=DPMSolverMultistepScheduler(**SD_SCHEDULE, algorithm_type="dpmsolver++"),
    )
