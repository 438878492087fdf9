"""Paper settings (DMM supp. A.5) and shared SD module names, in one leaf module (no torch): the sampler a merged model is
used with unless it, or a call, asks for another.

A merged model can carry its own recommended sampler in `sampler.json` (`SAMPLER_RECORD`): the
merge writes its synthesis settings there (the toy zoo's 10 steps, CFG 5, no negative prompt),
a few-step model its LCM settings. `dmm_ray.pipeline.sampler_defaults` reads it; DMMPipeline,
Serve, `/styles` and the playground follow it.
"""

PAPER_NEGATIVE_PROMPT = "worst quality, low quality, normal quality, lowres, watermark, nsfw"
PAPER_STEPS = 25  # DPM-Solver++ steps
PAPER_GUIDANCE = 7.0  # classifier-free guidance scale
PAPER_SCHEDULER = "DPMSolverMultistepScheduler"  # algorithm_type="dpmsolver++"

LCM_STEPS = 4  # a few-step (LCM) model without a sampler record
FEW_STEP_SCHEDULERS = {"tcd": "TCDScheduler", "lcm": "LCMScheduler"}  # fast.sampler -> the diffusers scheduler a few-step model is saved with
LCM_GUIDANCE = 1.0  # CFG off: the guidance is distilled in

SAMPLER_RECORD = "sampler.json"  # {"scheduler", "num_inference_steps", "guidance_scale"[, "negative_prompt"]}

# What SD LoRAs usually adapt (attention, feed-forward) plus the ResNet and in/out convs, where colour and
# texture live: the zoo's LoRA teachers and the default targets of the per-style adapters (extension).
SD_ADAPTER_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_in",
    "conv_out",
    "time_emb_proj",
)
# The layers of the timestep embedding (diffusers' TimestepEmbedding: linear_1, linear_2, and cond_proj where a guidance
# embedding exists). No style adapter can sit on them: the UNet's forward runs the timestep embedding before the
# class-embedding slot, where the style module computes the sample's style weights, and the export folds the style's
# MLP(e~) into time_embedding.linear_2's bias. Every other Linear / Conv2d of the UNet can be targeted.
TIME_EMBEDDING_LAYERS = ("time_embedding.linear_1", "time_embedding.linear_2", "time_embedding.cond_proj")


def adapter_target_matches(name: str, target: str) -> bool:
    """PEFT's `target_modules` rule: a target is the whole module name, or a dotted suffix of it."""
    return name == target or name.endswith("." + target)


def untargetable_problem(pairs) -> str | None:
    """Why style adapters cannot take some targets, or None. pairs: (target, the layer names it matches),
    resolved on a UNet (`style_adapters.target_modules`) or, for a config without one, against
    TIME_EMBEDDING_LAYERS alone (`timestep_targets_problem`): diffusers names those layers the same in
    every UNet, so both say the same."""
    bad = []
    for target, names in pairs:
        hit = [n for n in names if n in TIME_EMBEDDING_LAYERS]
        if hit:
            bad.append((target, hit, [n for n in names if n not in TIME_EMBEDDING_LAYERS]))
    if not bad:
        return None
    what = "; ".join(
        f"{target!r} matches {', '.join(hit)}"
        + (f" (name the other layers it matches in full: {', '.join(rest[:4])}{', ...' if len(rest) > 4 else ''})" if rest else "")
        for target, hit, rest in bad
    )
    return (
        f"style adapter targets: {what}. The UNet runs its timestep embedding ({', '.join(TIME_EMBEDDING_LAYERS)}) before the "
        "style module computes the sample's style weights, so no style adapter can sit on it; every other Linear/Conv2d "
        f"layer can be targeted (the default: {', '.join(SD_ADAPTER_TARGETS)})"
    )


def timestep_targets_problem(targets) -> str | None:
    """`untargetable_problem` of raw target strings, before any UNet is built (the config's validation)."""
    return untargetable_problem((t, [n for n in TIME_EMBEDDING_LAYERS if adapter_target_matches(n, t)]) for t in targets)
