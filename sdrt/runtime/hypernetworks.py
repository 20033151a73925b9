"""Choosing a bundle's hypernetwork for a request: A1111's `<hypernet:name:strength>` prompt tags and the
`hypernetwork=` option. The hypernetworks themselves are U-Net variants baked at export (export/hypernetwork.py);
here a request picks one and its strength, the scalar input `hypernetwork_strength`.

A1111 (extra_networks_hypernet.py) removes the tag from the text, defaults the strength to 1 and, with several
tags, applies each in turn. sdrt bakes each file, or each stack of files in order (`sdrt hypernetwork add
--stack`), into its own variant: several tags run the stack of those files in that order, each at its own
strength, and are refused with a message naming them when the bundle has no such stack. Strength 0 (all of
them 0, for a stack) runs the plain U-Net: the same image exactly.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidRequest
from . import names
from .manifest import Manifest

_TAG = re.compile(r"<hypernet:([^:>]+)(?::([^:>]*))?>")
ADD = "`sdrt hypernetwork add BUNDLE FILE.pt` (or `sdrt export SRC --out BUNDLE --hypernetwork FILE.pt`)"


@dataclass(frozen=True)
class Choice:
    name: str  # the variant's: a file's stem, or a stack's stems joined by "+"
    strengths: tuple[float, ...]  # one per file of the stack, in order
    component: str  # the bundle's U-Net variant

    @property
    def off(self) -> bool:
        return not any(self.strengths)

    def feeds(self) -> dict[str, np.float32]:
        """The variant's strength inputs."""
        return {names.strength_input(i): np.float32(s) for i, s in enumerate(self.strengths)}


def tag(name: str, strength: float) -> str:
    """<hypernet:name:strength>, the strength written so it reads back exactly."""
    short = f"{strength:g}"
    return f"<hypernet:{name}:{short if float(short) == strength else repr(float(strength))}>"


def strip_tags(prompt: str) -> str:
    """The prompt's text without its hypernet tags (they pick a U-Net, they are not words)."""
    return _TAG.sub("", prompt)


def parse_tags(prompt: str) -> list[tuple[str, float]]:
    """(name, strength) per `<hypernet:name[:strength]>`, in order."""
    return [(m[1].strip(), _strength(m[2], m[0])) for m in _TAG.finditer(prompt)]


def _strength(text, where: str) -> float:
    if text in (None, ""):
        return 1.0
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise InvalidRequest(f"hypernetwork {where} has strength {text!r}, not a finite number; write it as "
                             "<hypernet:name:0.8> (or --hypernetwork name:0.8)")
    return value


def parse_option(value) -> tuple[str, float] | None:
    """hypernetwork=: None, "name", "name:0.8" or ("name", 0.8)."""
    if value is None:
        return None
    if isinstance(value, str):
        name, _, strength = value.partition(":")
        return name.strip(), _strength(strength, repr(value))
    if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], str) and \
            not isinstance(value[1], bool) and isinstance(value[1], (int, float)):
        return value[0].strip(), _strength(str(value[1]), repr(tuple(value)))
    raise InvalidRequest(f"hypernetwork must be a name, 'name:strength' or (name, strength), got {value!r}")


def add_option(prompt: str, option) -> str:
    """The prompt with the hypernetwork= option as a tag at its end, unless the prompt already names that
    hypernetwork (then its own tag wins), as A1111's "Add hypernetwork to prompt" setting does."""
    chosen = parse_option(option)
    if chosen is None or chosen[0] in [name for name, _ in parse_tags(prompt)]:
        return prompt
    return f"{prompt} {tag(*chosen)}"


def choose(manifest: Manifest, prompt: str) -> Choice | None:
    """The hypernetwork (or stack) the prompt's tags ask for, after the option's tag was added to it."""
    tags = parse_tags(prompt)
    if not tags:
        return None
    name = "+".join(n for n, _ in tags)
    entry = manifest.hypernetworks.get(name)
    if entry is None or (len(tags) > 1) != ("stack" in entry):
        have = ", ".join(sorted(manifest.hypernetworks)) or "none"
        if len(tags) == 1:
            raise InvalidRequest(f"hypernetwork {name!r} is not in this bundle (it has: {have}); add its file "
                                 f"with {ADD}")
        listed = " and ".join(tag(n, s) for n, s in tags)
        if len({n for n, _ in tags}) < len(tags):
            raise InvalidRequest(f"the prompt names a hypernetwork twice ({listed}); keep one tag")
        files = " ".join(f"{n}.pt" for n, _ in tags)
        raise InvalidRequest(f"the prompt asks for several hypernetworks, {listed}; A1111 applies them one "
                             f"after the other, which needs them baked as a stack in this order: `sdrt hypernetwork "
                             f"add BUNDLE {files} --allow-pickle --stack` (this bundle has: {have}); or keep one tag")
    return Choice(name, tuple(s for _, s in tags), entry["component"])
