"""The configuration reference (docs/config.md), generated from `raycpt/core/config.py` as it is when this runs.

    python -m raycpt.config_reference > docs/config.md

One section per YAML section (a dataclass of `ExperimentConfig`), one row per field: its name, type, default,
the values `validate` allows (a tuple such as LOSS_IMPLS it checks the field against, or the bounds of its
`_check_range`) and the string literal under the field (its docstring). Everything is read from the config
module's source with `ast`, so a field added there shows up here without any change to this file;
tests/test_config_reference.py fails when the committed page differs from `render()`.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import textwrap
from dataclasses import dataclass
from typing import Any

import yaml

from raycpt.core import config as config_module

COMMAND = "python -m raycpt.config_reference > docs/config.md"
TOP_LEVEL = "top level"
"""The heading of the fields `ExperimentConfig` holds itself (name, storage_path)."""


@dataclass
class Field:
    name: str
    type: str
    default: str
    doc: str


@dataclass
class Section:
    name: str
    doc: str
    fields: list[Field]


def render(source: str | None = None) -> str:
    """The reference as markdown; `source` is the config module's text (default: the file as it is now)."""
    source = inspect.getsource(config_module) if source is None else source
    tree = ast.parse(source)
    namespace = vars(config_module)
    sections = _sections(tree, source, namespace)
    known = {_key(section.name, f.name) for section in sections for f in section.fields}
    allowed = _allowed_values(tree, namespace, known)
    intro = [f"Generated from the field docstrings of `raycpt/core/config.py` by `{COMMAND}`; edit the docstrings "
             "there, not this page (tests/test_config_reference.py fails when this page is out of date).",
             "Each section is a mapping in the experiment's YAML file; any field can also be set on the command "
             "line, e.g. `--set train.lr=3e-4` (values are YAML). `raycpt validate CONFIG` checks a config against "
             "the allowed values below.",
             "Sections: " + ", ".join(f"[{_section_title(s.name)}](#{_anchor(s.name)})" for s in sections) + "."]
    lines = ["# Configuration reference", ""]
    for paragraph in intro:
        lines += [textwrap.fill(paragraph, 120, break_long_words=False, break_on_hyphens=False), ""]
    for section in sections:
        lines += [f"## {_section_title(section.name)}", ""]
        if section.doc:
            lines += [_cell(section.doc), ""]
        lines += ["| field | type | default | allowed | description |", "|---|---|---|---|---|"]
        for f in section.fields:
            key = _key(section.name, f.name)
            lines.append(f"| `{key}` | {_code(f.type)} | {f.default} | {allowed.get(key, '')} | {_cell(f.doc)} |")
        lines.append("")
    removed = namespace.get("REMOVED_FIELDS") or {}
    if removed:
        lines += ["## Removed fields", "", "A config that names one of these is refused with this message.", "",
                  "| field | what to do |", "|---|---|"]
        lines += [f"| `{key}` | {_cell(why)} |" for key, why in removed.items()]
        lines.append("")
    return "\n".join(lines)


def _sections(tree: ast.Module, source: str, namespace: dict[str, Any]) -> list[Section]:
    """ExperimentConfig's fields: each `field(default_factory=SomeConfig)` is a section, the rest are top-level."""
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    top = Section(TOP_LEVEL, "", [])
    sections = [top]
    for f in _fields(classes["ExperimentConfig"], source, namespace):
        node = _field_node(classes["ExperimentConfig"], f.name)
        factory = _factory_name(node.value)
        if factory in classes:
            cls = classes[factory]
            sections.append(Section(f.name, ast.get_docstring(cls) or "", _fields(cls, source, namespace)))
        else:
            top.fields.append(f)
    return sections if top.fields else sections[1:]


def _fields(cls: ast.ClassDef, source: str, namespace: dict[str, Any]) -> list[Field]:
    """Every annotated field of a dataclass body, with the string literal right under it as its docstring."""
    out = []
    for i, node in enumerate(cls.body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        nxt = cls.body[i + 1] if i + 1 < len(cls.body) else None
        doc = (inspect.cleandoc(nxt.value.value) if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
               and isinstance(nxt.value.value, str) else "")
        out.append(Field(node.target.id, ast.unparse(node.annotation), _default(node.value, source, namespace), doc))
    return out


def _field_node(cls: ast.ClassDef, name: str) -> ast.AnnAssign:
    return next(n for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
                and n.target.id == name)


def _factory_name(value: ast.expr | None) -> str | None:
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "field":
        for kw in value.keywords:
            if kw.arg == "default_factory" and isinstance(kw.value, ast.Name):
                return kw.value.id
    return None


def _default(value: ast.expr | None, source: str, namespace: dict[str, Any]) -> str:
    """The default as a YAML user writes it: numbers as the source spells them (2e-4), the rest evaluated."""
    if value is None:
        return "required"
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "field":
        for kw in value.keywords:
            if kw.arg == "default_factory":
                return _yaml(_evaluate(kw.value, namespace)())
            if kw.arg == "default":
                value = kw.value
    number = value.operand if isinstance(value, ast.UnaryOp) else value
    if isinstance(number, ast.Constant) and isinstance(number.value, (int, float)) and not isinstance(
            number.value, bool):
        return f"`{ast.get_source_segment(source, value) or ast.unparse(value)}`"
    try:
        return _yaml(_evaluate(value, namespace))
    except Exception:  # a name this module does not define (a modified copy of the source): show the expression
        return _code(ast.unparse(value))


def _allowed_values(tree: ast.Module, namespace: dict[str, Any], known: set[str]) -> dict[str, str]:
    """`section.field` -> what `validate` allows, from its checks: `x.f not in CHOICES`, `set(x.f) - set(CHOICES)`
    and `_check_range(problems, "section.field", value, lo, hi, lo_open=...)`."""
    choices: dict[str, str] = {}
    ranges: dict[str, str] = {}
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef):
            continue
        aliases = _aliases(fn)
        for node in ast.walk(fn):
            if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.NotIn):
                key = _field_key(node.left, aliases, known)
                values = _values(node.comparators[0], namespace)
                if key and values is not None:
                    choices.setdefault(key, ", ".join(_code(str(v)) for v in values))
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub) and all(
                    _is_set_call(side) for side in (node.left, node.right)):
                key = _field_key(node.left.args[0], aliases, known)
                values = _values(node.right.args[0], namespace)
                if key and values is not None:
                    choices.setdefault(key, "any of " + ", ".join(_code(str(v)) for v in values))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_check_range"
                  and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                  and node.args[1].value in known):
                ranges.setdefault(node.args[1].value, _range_text(node, namespace))
    return {key: "; ".join(t for t in (choices.get(key, ""), ranges.get(key, "")) if t)
            for key in known if key in choices or key in ranges}


def _aliases(fn: ast.FunctionDef) -> dict[str, str]:
    """Local names bound to a config section in this function: `d, t = cfg.data, cfg.train` -> {d: data, t: train}."""
    out = {}
    for node in ast.walk(fn):
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target, value = node.targets[0], node.value
        pairs = (zip(target.elts, value.elts, strict=False) if isinstance(target, ast.Tuple)
                 and isinstance(value, ast.Tuple) else [(target, value)])
        for name, expr in pairs:
            if isinstance(name, ast.Name) and isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name):
                out[name.id] = expr.attr
    return out


def _field_key(node: ast.expr, aliases: dict[str, str], known: set[str]) -> str | None:
    """`d.txt_unit` (d a section alias) or `cfg.checkpoint.keep_weights` -> its dotted key, when it is a field."""
    chain = []
    while isinstance(node, ast.Attribute):
        chain.insert(0, node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or not chain:
        return None
    for key in (".".join([aliases.get(node.id, ""), *chain]).lstrip("."), ".".join(chain)):
        if key in known:
            return key
    return None


def _values(node: ast.expr, namespace: dict[str, Any]) -> list[Any] | None:
    try:
        value = _evaluate(node, namespace)
    except Exception:  # not a constant of the config module (a local set, say): no allowed values to show
        return None
    if isinstance(value, dict):
        return list(value)
    if isinstance(value, (tuple, list, set, frozenset)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return None


def _range_text(call: ast.Call, namespace: dict[str, Any]) -> str:
    names = list(inspect.signature(namespace["_check_range"]).parameters)  # (problems, where, value, lo, hi, ...)
    args = dict(zip(names, call.args, strict=False))
    args.update({kw.arg: kw.value for kw in call.keywords if kw.arg})

    def bound(name: str) -> Any:
        try:
            return _evaluate(args[name], namespace) if name in args else None
        except Exception:  # an expression of local names: show it as written
            return ast.unparse(args[name])

    lo, hi, lo_open = bound("lo"), bound("hi"), bound("lo_open")
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '≥'} {_number(lo)}")
    if hi is not None:
        parts.append(f"≤ {_number(hi)}")
    return " and ".join(parts)


def _evaluate(node: ast.expr, namespace: dict[str, Any]) -> Any:
    """A constant expression of the config module (`LOSS_IMPLS`, `metrics.SCHEDULABLE`, `1 << 17`, `list`)."""
    return eval(compile(ast.Expression(node), "<config>", "eval"), dict(namespace))  # our own source, no user input


def _is_set_call(node: ast.expr) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "set"
            and len(node.args) == 1)


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _yaml(value: Any) -> str:
    """A default as it would be written in the YAML file."""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`{value}`" if re.fullmatch(r"[\w./:+-]+", value) else _code(json.dumps(value))
    if isinstance(value, (list, dict)):
        text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
        return _code(json.dumps(value) if "\n" in text else text)  # a line break inside: JSON, which YAML reads too
    return _code(str(value))


def _key(section: str, name: str) -> str:
    return name if section == TOP_LEVEL else f"{section}.{name}"


def _section_title(name: str) -> str:
    return name if name == TOP_LEVEL else f"`{name}`"


def _anchor(name: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", name.lower()).replace(" ", "-")


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def _cell(text: str) -> str:
    """Docstring text as one table cell: one line; outside code spans, |, <, > and * cannot start markup."""
    parts = " ".join(text.split()).split("`")
    for i in range(0, len(parts), 2):  # even parts lie outside `code spans`
        parts[i] = parts[i].replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")
    for i in range(1, len(parts), 2):
        parts[i] = parts[i].replace("|", "\\|")
    return "`".join(parts)


def main() -> None:
    print(render(), end="")


if __name__ == "__main__":
    main()
