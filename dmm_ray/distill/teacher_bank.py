"""The teachers one worker hosts (`scaling.teachers_per_worker: k`), held as cheaply as they can be.

`TeacherBank.activate(j)` returns the UNet that computes teacher j's output, ready to run:
  resident   full teachers (diffusers folder, single file, .ckpt) as k frozen UNets on the device
  adapters   LoRA teachers of one base: the base UNet (and text encoder) ONCE, each LoRA loaded as a
             named PEFT adapter (diffusers `load_lora_weights(..., adapter_name=)`), switched with
             `set_adapters` per sub-batch; memory = one base + k adapters instead of k fused copies
  offloaded  `scaling.teacher_offload: true`: full teachers stay in CPU RAM (pinned on CUDA) and are
             copied into a device-resident "slot" UNet per sub-batch; on CUDA the next teacher is
             copied into a second slot on a side stream while the current one runs (`prefetch`)
Each teacher keeps its own text conditioner (its own text encoder: paper), resident on the device;
LoRA teachers of one base share the base's text encoder (its adapters switch with the UNet's).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Entry:
    unet: nn.Module | None  # a resident UNet, or the shared base of LoRA adapters
    conditioner: Any
    adapter: str | None = None  # PEFT adapter name on `pipe`
    pipe: Any = None
    scale: float = 1.0
    offload_index: int | None = None  # index into the OffloadPool


class OffloadPool:
    """Full teacher UNets of one architecture kept off the device; `acquire(i)` copies teacher i's
    weights into a device slot UNet and returns it. With `prefetch` (CUDA) a second slot receives the
    next teacher on a side stream while the current slot's forward runs. On CPU the copy is an
    ordinary tensor copy (the same code path, no stream)."""

    def __init__(self, unets: Sequence[nn.Module], device: torch.device | str, prefetch: bool = True):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        # weights stay in (pinned) CPU memory; the modules themselves are dropped by the caller
        self.states = [[t.detach().to("cpu").pin_memory() if cuda else t.detach().to("cpu") for t in _tensors(u)] for u in unets]
        n_slots = 2 if prefetch and len(unets) > 1 else 1
        self.slots = [copy.deepcopy(unets[0]).requires_grad_(False).eval().to(self.device) for _ in range(n_slots)]
        self.loaded: list[int | None] = [None] * n_slots
        self.ready: list[Any] = [None] * n_slots  # CUDA events: the slot's copy has finished
        self.active: int | None = None
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.copies = 0  # weight copies made (tests, logs)

    def __len__(self) -> int:
        return len(self.states)

    def _fill(self, slot: int, index: int, side_stream: bool) -> None:
        self.copies += 1
        dst = _tensors(self.slots[slot])
        if self.stream is not None and side_stream:
            # wait for work already queued on the slot (the previous sub-batch's forward), then copy there
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                for d, s in zip(dst, self.states[index]):
                    d.copy_(s, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            self.ready[slot] = event
        else:
            if self.ready[slot] is not None:  # a prefetch into this slot may still be copying: let it finish first
                torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
            for d, s in zip(dst, self.states[index]):
                d.copy_(s, non_blocking=self.stream is not None)
            self.ready[slot] = None
        self.loaded[slot] = index

    def _free_slot(self) -> int:
        return next((s for s in range(len(self.slots)) if s != self.active), 0)

    def prefetch(self, index: int) -> None:
        """Start copying teacher `index` into the slot that is not running (no-op with one slot)."""
        if index in self.loaded or len(self.slots) < 2:
            return
        self._fill(self._free_slot(), index, side_stream=True)

    def acquire(self, index: int) -> nn.Module:
        if index in self.loaded:
            slot = self.loaded.index(index)
        else:
            slot = self._free_slot() if len(self.slots) > 1 else 0
            self._fill(slot, index, side_stream=False)
        if self.ready[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
            self.ready[slot] = None
        self.active = slot
        return self.slots[slot]


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [p.data for p in module.parameters()] + list(module.buffers())


class TeacherBank:
    """k teachers; `activate(j)` -> the UNet to run for teacher j, `conditioner(j)` -> its text
    conditioning, `prefetch(j)` -> a hint that teacher j runs next."""

    def __init__(self, entries: Sequence[_Entry], pool: OffloadPool | None = None, names: Sequence[str] | None = None):
        self.entries, self.pool = list(entries), pool
        self.names = list(names) if names else [f"teacher_{j}" for j in range(len(self.entries))]

    @classmethod
    def adapters(
        cls, unet: nn.Module, adapter_names: Sequence[str], conditioners: Sequence[Any], scales: Sequence[float] | None = None
    ) -> "TeacherBank":
        """Teachers that are named PEFT adapters of one UNet (`unet.add_adapter` / `load_lora_adapter`)."""
        scales = list(scales) if scales is not None else [1.0] * len(adapter_names)
        return cls([_Entry(unet, c, adapter=a, pipe=unet, scale=s) for a, c, s in zip(adapter_names, conditioners, scales)])

    @classmethod
    def offloaded(cls, unets: Sequence[nn.Module], conditioners: Sequence[Any], device, prefetch: bool = True) -> "TeacherBank":
        """Full teachers kept off the device (see OffloadPool)."""
        pool = OffloadPool(unets, device, prefetch=prefetch)
        return cls([_Entry(None, c, offload_index=i) for i, c in enumerate(conditioners)], pool)

    @classmethod
    def resident(cls, unets: Sequence[nn.Module], conditioners: Sequence[Any]) -> "TeacherBank":
        return cls([_Entry(u, c) for u, c in zip(unets, conditioners)])

    def __len__(self) -> int:
        return len(self.entries)

    def conditioner(self, j: int):
        return self.entries[j].conditioner

    def activate(self, j: int) -> nn.Module:
        e = self.entries[j]
        if e.offload_index is not None:
            return self.pool.acquire(e.offload_index)
        if e.adapter is not None:
            if hasattr(e.pipe, "unet"):  # a pipeline: switches the UNet's and the text encoders' adapters
                e.pipe.set_adapters([e.adapter], adapter_weights=[e.scale])
            else:  # a bare UNet with PEFT adapters (benchmarks/gpu_distill.py)
                e.pipe.set_adapters([e.adapter], weights=[e.scale])
        return e.unet

    def prefetch(self, j: int) -> None:
        e = self.entries[j]
        if e.offload_index is not None and self.pool is not None:
            self.pool.prefetch(e.offload_index)

    def describe(self) -> str:
        kinds = []
        for e in self.entries:
            kinds.append("offloaded" if e.offload_index is not None else "adapter" if e.adapter else "resident")
        shared = len({id(e.unet) for e in self.entries if e.adapter})
        parts = [f"{kinds.count(k)} {k}" for k in ("resident", "adapter", "offloaded") if kinds.count(k)]
        extra = f" ({shared} shared LoRA base{'s' if shared > 1 else ''})" if shared else ""
        return ", ".join(parts) + extra


def _lora_group_key(spec) -> str | None:
    return str(spec.base) if spec.resolved_format() == "lora" and spec.base else None


def load_teacher_bank(
    specs: Sequence,
    device: torch.device | str,
    conditioner_factory,
    dtype: torch.dtype | None = None,
    offload: bool = False,
    share_lora_base: bool = True,
    prefetch: bool = True,
) -> TeacherBank:
    """Load the worker's teachers. `conditioner_factory(parts)` makes a text conditioner from
    anything with text_encoder(s)/tokenizer(s) (dmm_ray.distill.conditioning.conditioner_for).
    LoRA teachers that name the same `base:` share one base pipeline when `share_lora_base`
    and at least two do (a lone LoRA is fused into its own copy); full teachers are offloaded when `offload`."""
    from dmm_ray.teachers import Teacher, TeacherError, _safetensors_keys, load_teacher_pipeline

    device = torch.device(device)
    specs = list(specs)
    groups: dict[str, list[int]] = {}
    if share_lora_base:
        for j, spec in enumerate(specs):
            key = _lora_group_key(spec)
            if key is not None:
                groups.setdefault(key, []).append(j)
    groups = {base: members for base, members in groups.items() if len(members) > 1}  # a lone LoRA: fused (no per-step LoRA cost)
    entries: list[_Entry | None] = [None] * len(specs)
    for base, members in groups.items():
        from pathlib import Path

        from dmm_ray.architectures import base_pipeline_class, pipeline_kwargs

        cls = base_pipeline_class(base)
        kwargs = dict(**pipeline_kwargs(cls), local_files_only=True)
        if dtype is not None:
            kwargs["torch_dtype"] = dtype
        pipe = cls.from_pretrained(base, **kwargs)
        pipe.vae = None  # workers never decode
        for j in members:
            spec = specs[j]
            _safetensors_keys(Path(spec.source), spec.name)
            try:
                pipe.load_lora_weights(spec.source, adapter_name=_adapter_name(j, spec.name))
            except (OSError, ValueError, RuntimeError, KeyError) as error:
                raise TeacherError(f"teacher {spec.name!r}: could not load {spec.source} as a LoRA adapter: {error}") from error
        for module in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if module is not None:
                module.requires_grad_(False).eval().to(device)
        cond = conditioner_factory(pipe)
        for j in members:
            entries[j] = _Entry(pipe.unet, cond, adapter=_adapter_name(j, specs[j].name), pipe=pipe, scale=specs[j].lora_scale)
    offloaded: list[tuple[int, nn.Module]] = []
    for j, spec in enumerate(specs):
        if entries[j] is not None:
            continue
        pipe = load_teacher_pipeline(spec, torch_dtype=dtype)
        te2 = getattr(pipe, "text_encoder_2", None)
        for module in (pipe.text_encoder, te2):
            if module is not None:
                module.requires_grad_(False).eval().to(device)
        parts = Teacher(spec.name, None, pipe.text_encoder, pipe.tokenizer, None, None, spec, te2, getattr(pipe, "tokenizer_2", None))
        unet = pipe.unet.requires_grad_(False).eval()
        if offload:
            offloaded.append((j, unet))
            entries[j] = _Entry(None, conditioner_factory(parts), offload_index=len(offloaded) - 1)
        else:
            entries[j] = _Entry(unet.to(device), conditioner_factory(parts))
        del pipe
    pool = OffloadPool([u for _, u in offloaded], device, prefetch=prefetch) if offloaded else None
    return TeacherBank(entries, pool, [s.name for s in specs])


def _adapter_name(j: int, name: str) -> str:
    return f"teacher_{j}_{''.join(c if c.isalnum() else '_' for c in name)}"
