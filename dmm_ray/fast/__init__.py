"""The few-step model: latent consistency distillation (LCM) of a merged DMM model.

dmm_ray.fast.config   FastConfig (the `fast:` section; no torch)
dmm_ray.fast.lcm      the consistency objective: DDIM solver, boundary scalings, CFG teacher
dmm_ray.fast.loop     the Ray Train worker
dmm_ray.fast.job      the driver: train, save the DMMPipeline with LCMScheduler, evaluate, register
"""
