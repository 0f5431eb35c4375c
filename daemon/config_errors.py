"""Pydantic's validation errors for the config, as one line each: the key path, the bad value, what was expected,
and a fix where one is known (the closest key for a typo, quotes for a number YAML read where text is meant).

Kept apart from :mod:`daemon.config` so the config models stay readable; the root model is passed in, so this module
imports nothing of the config's.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from typing import Annotated, Any, Union

from pydantic import BaseModel

_TAGS = {"onnxruntime", "openvino", "litert"}
#: the user:password@ of a URL inside a message
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]*@")


def describe(err: Any, root: type[BaseModel]) -> str:
    """One line for one of ``ValidationError.errors()``; ``root`` is the model the config was validated as."""
    loc = [part for part in err["loc"] if not (isinstance(part, str) and part in _TAGS)]
    path = _format_loc(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        hint = _suggest(root, list(err["loc"]))
        return f"{path}: unknown key{hint}"
    if kind == "missing":
        return f"{path}: required key is missing"
    value = err.get("input")
    msg = _USERINFO.sub(r"\1***@", err["msg"])  # a validator may have quoted the value too
    if kind == "keyed":
        return f"{path}{err.get('ctx', {}).get('at', '')}: {msg}"
    if kind == "union_tag_invalid":
        return f"{path}.runtime: {value.get('runtime')!r} is not a known runtime (expected one of {sorted(_TAGS)})"
    if kind == "union_tag_not_found":
        return f"{path}.runtime: required key is missing (expected one of {sorted(_TAGS)})"
    shown = repr(_without_userinfo(value)) if not isinstance(value, (dict, list)) else type(value).__name__
    where = path or "config"
    return f"{where}: {shown} is not valid: {msg}{_quote_hint(kind, value, loc)}"


def _without_userinfo(value: Any) -> Any:
    """A URL's ``user:password@`` is never repeated in an error (it is a secret put where it does not belong)."""
    if isinstance(value, str) and "://" in value and "@" in value:
        scheme, _, rest = value.partition("://")
        authority, sep, tail = rest.partition("/")
        if "@" in authority:
            return f"{scheme}://***@{authority.rpartition('@')[2]}{sep}{tail}"
    return value


def _quote_hint(kind: str, value: Any, loc: list[Any]) -> str:
    """YAML types unquoted scalars: ``version: 2`` is a number and ``name: yes`` a boolean where text is meant."""
    if kind != "string_type" or not isinstance(value, (bool, int, float)):
        return ""
    key = f"{loc[-1]}: " if loc and isinstance(loc[-1], str) else ""
    if isinstance(value, bool):
        return f" (YAML reads unquoted true/false/yes/no/on/off as a boolean: quote the text, {key}\"...\")"
    text = str(value) if isinstance(value, int) else "..."
    return f" (YAML reads an unquoted {value!r} as a number: quote it, {key}\"{text}\")"


def _format_loc(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _suggest(root: type[BaseModel], loc: list[Any]) -> str:
    """' (did you mean 'x'?)' for a mistyped key, found by walking the model classes along the path."""
    if not loc or not isinstance(loc[-1], str):
        return ""
    fields = _fields_at(root, loc[:-1])
    if not fields:
        return ""
    match = difflib.get_close_matches(loc[-1], fields, n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else f" (expected one of: {', '.join(sorted(fields))})"


def _fields_at(model: Any, loc: list[Any]) -> list[str]:
    annotation: Any = model
    for part in loc:
        if isinstance(part, str) and part in _TAGS:
            annotation = _union_member(annotation, part)
            continue
        annotation = _unwrap(annotation)
        if isinstance(part, int):
            args = typing.get_args(annotation)
            annotation = args[0] if args else None
            continue
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part)
            if field is None:
                return []
            annotation = field.annotation
        else:
            return []
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def _union_member(annotation: Any, tag: str) -> Any:
    """The member of a runtime-discriminated union whose ``runtime`` literal is ``tag``."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    for member in typing.get_args(annotation):
        field = getattr(member, "model_fields", {}).get("runtime")
        if field is not None and tag in typing.get_args(field.annotation):
            return member
    return annotation


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated/Optional; a union of models becomes the union of their fields via the first member."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = members[0]
        else:
            return annotation
