"""Read a YAML recipe into a frozen ``Recipe``.

``load_recipe(path, overrides)`` returns a frozen ``Recipe``; every error names the file, the line and the
dotted field path (``recipes/x.yaml:7 engine.targets[1]: ...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from dtcompile.core.errors import RecipeError
from dtcompile.recipe.base import ItemError
from dtcompile.recipe.quant import FORMAT_NAMES
from dtcompile.recipe.schema import Recipe

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Line (1-based) of the YAML node at ``loc``, or of the deepest ancestor found."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            match = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
            if match is None:
                key = next((k for k, _ in node.value if getattr(k, "value", None) == part), None)
                return key.start_mark.line + 1 if key is not None else line
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        line = node.start_mark.line + 1
    return line


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic adds validator/union tags (e.g. 'function-after[...]', the union member 'fp8'); drop them.
    out: list[Any] = []
    for p in loc:
        if isinstance(p, str) and ("[" in p or "(" in p or (out[-1:] == ["quant"] and p in FORMAT_NAMES)):
            continue
        out.append(p)
    return tuple(out)


def _message(err: ErrorDetails) -> tuple[tuple[Any, ...], str]:
    loc = _clean_loc(tuple(err["loc"]))
    ctx = err.get("ctx") or {}
    exc = ctx.get("error")
    if isinstance(exc, ItemError):
        loc = (*loc, exc.field, exc.index) if exc.field else (*loc, exc.index)
        return loc, str(exc)
    kind = err["type"]
    if kind == "extra_forbidden":
        return loc, "unknown key; check the spelling against the recipe schema (docs/recipes.md)"
    if kind == "missing":
        return loc, "required field is missing"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    inp = err.get("input")
    if kind not in ("missing",) and not isinstance(inp, (dict, list)):
        shown = repr(inp)
        msg = f"{shown if len(shown) <= 80 else shown[:60] + f'... ({len(shown)} characters)'}: {msg}"
    return loc, msg


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur: Any = data
    for part in parts[:-1]:
        if not isinstance(cur, dict):
            raise RecipeError(f"--set {dotted}: '{part}' is not a section")
        cur = cur.setdefault(part, {})
    if not isinstance(cur, dict):
        raise RecipeError(f"--set {dotted}: parent is not a section")
    cur[parts[-1]] = value


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML lets the last one win silently)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key (a list or mapping): not a recipe key at all
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain name", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first given on line {seen[key]})", key_node.start_mark
            )
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _shown(item: str, limit: int = 100) -> str:
    """A ``--set`` item as a message shows it: one line, a long one cut (``...`` and its length)."""
    text = _one_line(item)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} characters)"


def _yaml_error(exc: yaml.YAMLError) -> tuple[str, str]:
    """(``:line`` or "", the problem in one line) of a YAML error."""
    mark = getattr(exc, "problem_mark", None)
    where = f":{mark.line + 1}" if mark else ""
    return where, _one_line(getattr(exc, "problem", None) or str(exc))


def _safe_load(text: str) -> Any:
    """YAML -> data with duplicate keys refused; nesting too deep for the parser is a YAML error too."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None
    except ValueError as exc:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise yaml.YAMLError(
            f"a number too long to read ({_one_line(str(exc)).split(';')[0].split(': ')[-1]})"
        ) from None


def parse_overrides(items: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """Parse ``a.b=c`` overrides; values are YAML (``--set engine.targets=[sm_89]``)."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"--set '{_shown(item)}': expected KEY=VALUE, e.g. export.opset=19")
        if any(not part.strip() for part in key.split(".")):
            raise RecipeError(f"--set '{_shown(item)}': '{key}' is not a dotted field path, e.g. export.opset")
        try:
            value = _safe_load(raw)
        except yaml.YAMLError as exc:
            raise RecipeError(f"--set '{_shown(item)}': the value is not valid YAML ({_yaml_error(exc)[1]})") from None
        out.append((key, value))
    return out


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError naming file, line and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror or exc})") from None
    try:
        data = _safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        where, problem = _yaml_error(exc)
        raise RecipeError(f"{path}{where}: invalid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of sections (model, export, ...)")
    overridden = set()
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
        overridden.add(key)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc, msg = _message(err)
        dotted = _dotted(loc)
        if any(dotted == k or dotted.startswith(k + ".") or dotted.startswith(k + "[") for k in overridden):
            raise RecipeError(f"--set {dotted}: {msg}") from None
        line = _line_of(node, loc)
        where = f"{path}:{line}" if line else str(path)
        raise RecipeError(f"{where} {dotted}: {msg}" if dotted else f"{where}: {msg}") from None
