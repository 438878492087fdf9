"""The commands README.md and docs/ give a user to copy name options and config keys that exist.

Each `--flag` after `python jobs/X.py`, `python benchmarks/X.py`, `python -m dmm_ray.memory_plan` or a bare
`jobs/X.py` (a fenced line, joined across `\\` continuations, or an inline `...` span: "`jobs/fast.py
--dry-run`") must be an option of that script's own argument parser, and each `--set key=value` key a key of
the config that script reads: a flag or key renamed in the code would otherwise leave the README telling
users to type what the job refuses."""

from __future__ import annotations

import argparse
import os
import re
import runpy
import sys
from functools import cache
from pathlib import Path

import pytest

from dmm_ray.config import MergeConfig
from dmm_ray.data.config import DataConfig
from dmm_ray.evaluation.config import EvalConfig
from dmm_ray.overrides import _section_model

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
SCRIPT = re.compile(r"(?:\bpython3?\s+(?:-m\s+)?|(?<![\w/.-]))((?:jobs|benchmarks)/\w+\.py|dmm_ray\.memory_plan)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
SET_KEY = re.compile(r"--set\s+[\"']?([\w.]+)=")
# The README's own example of the error an unknown key gets ("The merge job": `--set distill.stepz=3`).
MEANT_TO_FAIL = {"distill.stepz"}
# The config each script's `--set` changes (evaluate / style_mixing: EvalConfig fields, also under a merge
# config's `evaluation:` with --section; encode_latents: DataConfig keys, an optional leading `data.`).
CONFIGS = {
    "jobs/merge.py": MergeConfig,
    "jobs/fast.py": MergeConfig,
    "jobs/demo.py": MergeConfig,
    "dmm_ray.memory_plan": MergeConfig,
    "benchmarks/fidelity_curve.py": MergeConfig,
    "benchmarks/table1.py": MergeConfig,
    "benchmarks/packing_equivalence.py": MergeConfig,
    "benchmarks/fast_fidt.py": MergeConfig,
    "jobs/evaluate.py": EvalConfig,
    "jobs/style_mixing.py": EvalConfig,
    "jobs/encode_latents.py": DataConfig,
}


def commands(text: str):
    """(line, command) for every fenced line (continuations joined) and every inline `...` span of `text`."""
    lines = text.split("\n")
    fenced = False
    i = 0
    while i < len(lines):
        line, start = lines[i], i
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i]
            yield start + 1, line
        i += 1
    prose = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    for m in re.finditer(r"`([^`]+)`", prose):  # an inline command may wrap onto the next line
        yield prose.count("\n", 0, m.start()) + 1, m.group(1).replace("\n", " ")


class _Parsed(BaseException):  # not an Exception: the jobs' cli_main must not turn it into an error line
    def __init__(self, parser):
        self.parser = parser


@cache
def options(script: str) -> frozenset[str]:
    """The option strings of `script`'s argument parser, caught when its main parses the command line."""

    def caught(parser, *args, **kwargs):
        raise _Parsed(parser)

    saved, environ = (argparse.ArgumentParser.parse_known_args, sys.argv), dict(os.environ)
    argparse.ArgumentParser.parse_known_args = caught
    sys.argv = [script]
    try:
        if script.endswith(".py"):
            runpy.run_path(str(REPO / script), run_name="__main__")
        else:
            runpy.run_module(script, run_name="__main__", alter_sys=True)
    except _Parsed as parsed:
        return frozenset(o for action in parsed.parser._actions for o in action.option_strings)
    finally:
        argparse.ArgumentParser.parse_known_args, sys.argv = saved
        os.environ.clear()  # a module-level import may set a variable (serve's app: RAY_ADDRESS=local beside a stale
        os.environ.update(environ)  # Ray address file); the tests after this one share the process
    raise AssertionError(f"{script} never parsed its command line")


def key_problem(model: type, key: str) -> str | None:
    """Why the dotted `key` is not a key of `model` (list items by index), or None."""
    section, path = model, []
    for part in key.split("."):
        if part.isdigit() and path:
            path.append(part)
            continue
        known = {*section.model_fields, *getattr(section, "shorthand_keys", ())} if section is not None else set()
        if part not in known:
            where = ".".join(path) or "the top level"
            return f"{part!r} is not a key of {where} ({', '.join(sorted(known)) or 'no keys: not a section'})"
        path.append(part)
        field = section.model_fields.get(part)
        section = _section_model(field.annotation) if field is not None else None
    return None


def problems(text: str, name: str = "README.md") -> list[str]:
    found = []
    for line, command in commands(text):
        for m in SCRIPT.finditer(command):
            script = m.group(1)
            if script.endswith(".py") and not (REPO / script).is_file():
                found.append(f"{name}:{line}: {script} does not exist")
                continue
            rest = re.split(r"\s#|&&|;|\|\s|\bpython3?\s", command[m.end() :])[0]  # up to a comment or the next command
            unknown = sorted(set(FLAG.findall(rest)) - options(script))
            found += [f"{name}:{line}: {script} has no option {flag}: {command.strip()}" for flag in unknown]
            model = CONFIGS.get(script)
            for key in SET_KEY.findall(rest) if model is not None else ():
                key = key.removeprefix("data.") if model is DataConfig else key
                if key not in MEANT_TO_FAIL and (why := key_problem(model, key)):
                    found.append(f"{name}:{line}: {script} --set {key}: {why}")
    return found


def test_the_checker_catches_a_wrong_flag_and_a_wrong_key():
    text = "```bash\npython jobs/merge.py --dry-rn \\\n    --set distill.step=3   # a comment --not-a-flag\n```\n"
    text += "and inline: `python jobs/evaluate.py --model M\n--teachers T --set sampler.steps=2`."
    found = problems(text)
    assert len(found) == 3, found
    assert "jobs/merge.py has no option --dry-rn" in found[0]
    assert "'step' is not a key of distill" in found[1] and "steps" in found[1]
    assert found[2].startswith("README.md:5: jobs/evaluate.py --set sampler.steps") and "num_inference_steps" in found[2]
    assert problems("prose names `jobs/fast.py --dryrun` too") == ["README.md:1: jobs/fast.py has no option --dryrun: jobs/fast.py --dryrun"]
    assert problems("`python jobs/merge.py --dry-run --set distill.steps=3 --set zoo_teachers.0=2`") == []
    assert problems("`python jobs/encode_latents.py --set data.encode.dtype=float16`") == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_documented_commands_use_existing_options_and_keys(doc):
    found = problems(doc.read_text(), str(doc.relative_to(REPO)))
    assert not found, "\n".join(found)
