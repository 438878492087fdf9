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
