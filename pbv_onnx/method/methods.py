"""Method names -> (cotangent rule, default path), and the one function that turns a request into a
validated attribution (rule x path x path options), before any computation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from pbv_onnx.base.errors import UsageError
from pbv_onnx.method.cotangents import RULES
from pbv_onnx.method.paths import PATHS, Option, Vjp
from pbv_onnx.runtime.images import Preprocessing

# A method name keeps its meaning: the rule it backpropagates and the path it takes by default.
# A rule no method here is named after is a method of its own on the plain path (method_table).
METHODS: dict[str, tuple[str, str]] = {
    "parallel": ("parallel", "plain"),
    "gradient": ("gradient", "plain"),
    "grad-x-act": ("grad-x-act", "plain"),
    "integrated": ("parallel", "integrated"),
}


@dataclass(frozen=True)
class Attribution:
    """A validated attribution: a registered rule, a registered path and all of the path's options."""

    rule: str
    path: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The method name meaning this rule and path, else "rule+path" (the `method` of outputs)."""
        for name, pair in method_table().items():
            if pair == (self.rule, self.path):
                return name
        return f"{self.rule}+{self.path}"

    def cotangents(self, weight: np.ndarray, phi_o: np.ndarray, phi_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(v_o, v_b), float64 [D] each, by the rule."""
        return RULES[self.rule].cotangents(weight, phi_o, phi_b)

    def attribute(self, vjp: Vjp, images: np.ndarray, cotangents: np.ndarray, spec: Preprocessing) -> np.ndarray:
        """Input gradients [N, 3, H, W] along the path, with its options."""
        return PATHS[self.path].attribute(vjp, images, cotangents, spec, **self.options)

    def description(self) -> dict[str, Any]:
        """What decides the gradients (for checkpoint keys): method label, rule, path and options."""
        return {"method": self.label, "rule": self.rule, "path": self.path, "path_options": dict(self.options)}

    def attrs(self) -> dict[str, str]:
        """NetCDF attributes saying what was computed."""
        return {
            "method": self.label,
            "rule": self.rule,
            "path": self.path,
            "path_options": json.dumps(dict(self.options), sort_keys=True),
        }


def _options_by_name() -> dict[str, list[Option]]:
    by_name: dict[str, list[Option]] = {}
    for p in PATHS.values():
        for o in p.options:
            by_name.setdefault(o.name, []).append(o)
    return by_name


def option(name: str) -> Option:
    """The path option called `name` (the first path's that declares it), for a command line's flag."""
    return _options_by_name()[name][0]


def path_options(items: Sequence[str]) -> dict[str, str]:
    """{name: value text} of NAME=VALUE items (a command line's generic path options)."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(None, f"path_option must be NAME=VALUE, not {item!r}", param="path_option")
        out[name.strip()] = value.strip()
    return out


def method_table() -> dict[str, tuple[str, str]]:
    """Every method name: METHODS, then each rule no method is named after, as itself on the plain path."""
    return {**METHODS, **{r: (r, "plain") for r in RULES if r not in METHODS}}


def parse_label(label: str) -> tuple[str, str] | None:
    """(rule, path) of a method name or of a "rule+path" label as outputs record it, None for neither."""
    table = method_table()
    if label in table:
        return table[label]
    rule, _, path = label.partition("+")
    return (rule, path) if rule in RULES and path in PATHS else None


def resolve(method: str | Attribution = "parallel", path: str | None = None, **options: Any) -> Attribution:
    """The validated attribution of a method name (or a "rule+path" label), an optional path that
    overrides the method's default, and path options (None: the default).

    UsageError, naming the parameter, for an unknown method, path or option and for a bad option
    value, whichever path declares it; options of paths other than the chosen one are checked and
    then left out (a command line passes all of them).
    """
    given = {k: v for k, v in options.items() if v is not None}
    if isinstance(method, Attribution):
        if path is None and not given:
            return method
        rule, default_path = method.rule, method.path
        given = {**method.options, **given}
    else:
        parsed = parse_label(method) if isinstance(method, str) else None
        if parsed is None:
            raise UsageError(None, f"method must be one of {', '.join(method_table())}, not {method!r}", param="method")
        rule, default_path = parsed
    path = default_path if path is None else path
    if path not in PATHS:
        raise UsageError(None, f"path must be one of {', '.join(PATHS)}, not {path!r}", param="path")
    declared = _options_by_name()
    own = {o.name: o for o in PATHS[path].options}
    chosen = PATHS[path].defaults()
    for name in options:
        if name not in declared:
            raise UsageError(None, f"unknown path option {name!r} (the paths' options: {', '.join(declared)})")
    for name, value in given.items():
        if name in own:
            chosen[name] = own[name].check(value)
        else:  # another path's option: still checked, as a command line gives them all
            for opt in declared[name]:
                opt.check(value)
    return Attribution(rule, path, chosen)


def panel_label(label: str) -> str:
    """What the figures call the maps of a method label ("shared features" for parallel)."""
    parsed = parse_label(label)
    return RULES[parsed[0]].panel_label if parsed else label


def describe(attrs: Mapping[str, Any]) -> str:
    """One line for the report: the method label, its rule and its path with options."""
    label = str(attrs.get("method", ""))
    parsed = parse_label(label)
    if parsed is None:
        return label
    rule, path = str(attrs.get("rule", parsed[0])), str(attrs.get("path", parsed[1]))
    try:
        opts = json.loads(attrs.get("path_options", "{}"))
    except (TypeError, ValueError):
        opts = {}
    shown = ", ".join(f"{k} {v}" for k, v in opts.items())
    return f"{label}: rule {rule} ({RULES[rule].description if rule in RULES else '?'}); path {path}" + (
        f" ({shown})" if shown else ""
    )


def help_text() -> str:
    """The methods as a command line's help lists them."""
    return ", ".join(
        name if (r, p) == (name, "plain") else f"{name} (rule {r}, path {p})" for name, (r, p) in method_table().items()
    )


def path_help() -> str:
    """The paths and their options as a command line's help lists them."""
    return ", ".join(
        name + (f" ({', '.join(o.name for o in p.options)})" if p.options else "") for name, p in PATHS.items()
    )
