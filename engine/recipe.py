"""Reading a recipe: TOML, `extends`, `table.key=value` overrides, typing against the schema
(engine/config.py), the names of registered losses and forward modes, and writing it back.

Precedence is CLI override > recipe file > the file it `extends` > defaults. Every problem found
(unknown keys with a "did you mean" hint, wrong types, out-of-range or conflicting values, unknown
loss or forward-mode names) is reported in one UserError, a line each in the recipe's order.
`python -m engine.recipe --doc` prints the recipe reference (the README's table).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from engine import losses
from engine.config import Config, DataSource, Problems, absolute_paths, check, field_docs
from engine.errors import UserError, closest, did_you_mean, suggestion
from engine.forward import FORWARD_MODES
from engine.peer_names import PEER_KEYS, PEER_LOSSES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

# ----------------------------------------------------------------------------------------------
# Unknown keys and names: hints


def _unknown_key_hint(prefix: str, name: str, cls: type) -> str:
    """The hint for the unknown key `name` in table `prefix` of schema `cls` ("" and Config at the
    top level): another tool's name for an fsdpo key (engine/peer_names.py), else the same name
    in another table (`beta` -> `loss.beta`), else a close spelling in this table; "" if none."""
    peer = PEER_KEYS.get(f"{prefix}.{name}") or PEER_KEYS.get(name)
    if peer:
        key, note = peer
        if not key:
            return f" ({note})"
        return f' (did you mean "{key}"?{" " + note if note else ""})'
    tables = typing.get_type_hints(Config)
    elsewhere = [
        f"{table}.{name}"
        for table, table_cls in tables.items()
        if table_cls is not cls and name in typing.get_type_hints(table_cls)
    ]
    if elsewhere:
        return suggestion(*elsewhere)
    close = closest(name, typing.get_type_hints(cls))
    return suggestion(f"{prefix}.{close}" if prefix else close) if close else ""


def _unknown_loss_hint(name: str) -> str:
    """The hint for an unknown `loss.type` name: another tool's name for it, else a close spelling."""
    short = name.rsplit(".", 1)[-1]  # torchtune's `torchtune.rlhf.loss.DPOLoss`
    if short in PEER_LOSSES:
        peer, ours = PEER_LOSSES[short]
        if ours:
            return f' ({peer}\'s "{short}" is fsdpo\'s "{ours}")'
        return f' ({peer}\'s "{short}" is not in fsdpo, which has {", ".join(sorted(losses.LOSSES))})'
    return did_you_mean(name, losses.LOSSES)


# ----------------------------------------------------------------------------------------------
# Typing of TOML values against the schema


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(f'"{a}"' for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"list of {_type_name(item)}"
    if origin is dict:
        return f"table of {_type_name(typing.get_args(tp)[1])}s"
    if dataclasses.is_dataclass(tp):
        return "table"
    return {str: "string", int: "integer", float: "number", bool: "true/false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str, problems: Problems) -> Any:
    """Return `value` converted to schema type `tp`, or raise UserError naming `key`. Tables are
    built by `_build_table`, which records their keys' problems in `problems` instead."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = did_you_mean(str(value), choices)
            raise UserError(f"{key}: expected one of {_type_name(tp)}, got {value!r}{hint}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key, problems)
            except UserError:
                continue
        raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item_tp) and not isinstance(value, list):
            value = [value]
        if not isinstance(value, list):
            raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        _, value_tp = typing.get_args(tp)  # keys are TOML keys, so always strings
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a {_type_name(tp)}, e.g. {{ name = ... }}, got {value!r}")
        return {k: _coerce(v, value_tp, f"{key}.{k}", problems) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and tp is DataSource:
            value = {"path": value}
        if not isinstance(value, dict):
            expected = "a table or a path" if tp is DataSource else f"a [{key}] table"
            raise UserError(f"{key}: expected {expected}, got {value!r}")
        return _build_table(tp, value, key, problems)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise UserError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported schema type {tp!r} for {key}")


def _build_table(cls: type, values: dict[str, Any], prefix: str, problems: Problems) -> Any:
    """`cls` from a TOML table; an unknown key or a value of the wrong type is recorded in
    `problems` (and that field keeps its default) so that the other keys are still checked."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in hints:
            where = f"[{prefix}]" if prefix else "the recipe"
            problems.add(key, f"{key}: unknown key in {where}{_unknown_key_hint(prefix, name, cls)}")
            continue
        try:
            kwargs[name] = _coerce(value, hints[name], key, problems)
        except UserError as e:
            problems.add(key, *e.lines, failed=True)
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------
# Loading: extends, overrides, validation, paths


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: recipe file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _resolve_extends(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise UserError(f"{path}: `extends` forms a cycle")
    raw = _read_toml(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise UserError(f"{path}: extends: expected a path string, got {parent!r}")
    parent_path = path.parent / parent
    if not parent_path.is_file():
        raise UserError(f"{path}: extends: {parent_path} not found")
    return _merge(_resolve_extends(parent_path, (*seen, path)), raw)


def _parse_override(text: str) -> Any:
    """Parse the value of `key=value` from the command line: TOML syntax, strings bare."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _field_type(dotted: str) -> Any:
    """Schema type of a dotted key, or raise UserError with a hint."""
    table, _, name = dotted.partition(".")
    tables = typing.get_type_hints(Config)
    if table not in tables or not name:
        extra = "" if table in tables else _unknown_key_hint("", table, Config)
        raise UserError(f"{dotted}: overrides look like table.key=value{extra}")
    hints = typing.get_type_hints(tables[table])
    if name not in hints:
        raise UserError(f"{dotted}: unknown key in [{table}]{_unknown_key_hint(table, name, tables[table])}")
    return hints[name]


def apply_overrides(raw: dict[str, Any], overrides: list[str], problems: Problems) -> dict[str, Any]:
    """`raw` with each `table.key=value` set; a malformed or unknown override is recorded, skipped."""
    raw = _merge(raw, {})
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        try:
            if not sep:
                raise UserError(f"{item}: overrides look like table.key=value")
            tp = _field_type(key)
        except UserError as e:
            problems.add("", *e.lines)
            continue
        table, _, name = key.partition(".")
        if not isinstance(raw.setdefault(table, {}), dict):
            continue  # reported when the table is typed
        raw[table] = {**raw[table], name: text if tp is str else _parse_override(text)}
    return raw


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a recipe (following `extends`), apply `table.key=value` overrides, type and validate
    it, and make its local paths absolute (`engine.config.absolute_paths`). Every problem found is reported
    in one UserError, a line each; a recipe that cannot be read stops at once."""
    raw = _resolve_extends(Path(path))
    problems = Problems()
    raw = apply_overrides(raw, list(overrides), problems)
    cfg = _build_table(Config, raw, "", problems)
    check(cfg, problems)
    check_names(cfg, problems)
    problems.raise_if_any(raw)
    return absolute_paths(cfg)


def check_names(cfg: Config, problems: Problems) -> None:
    """The recipe's names of registered things: each `loss.type` in `engine.losses.LOSSES` and
    the settings its losses take (`engine.losses.check_settings`), `training.forward_mode` in
    `engine.forward.FORWARD_MODES`, and what a mode allows (token budgets and sequence parallelism need a
    padding-free one)."""
    names = [cfg.loss.type] if isinstance(cfg.loss.type, str) else cfg.loss.type
    for name in names:
        problems.require(
            name in losses.LOSSES, f"loss.type: unknown loss {name!r}{_unknown_loss_hint(name)}", "loss.type"
        )
    losses.check_settings(cfg.loss, problems)
    losses.check_read_settings(cfg.loss, problems)
    # (the specs by name: `losses.unpaired` would raise the loss API's check of the settings)
    specs = [losses.LOSSES[name] for name in names] if all(n in losses.LOSSES for n in names) else []
    if specs and not any(spec.unpaired for spec in specs):
        d = cfg.data
        unpaired_settings = {"unpair": d.unpair, "kl_shift_chunk": d.kl_shift_chunk, "format": d.format}
        takers = ", ".join(n for n, spec in losses.LOSSES.items() if spec.unpaired)
        for key, value in unpaired_settings.items():
            problems.require(
                value not in (True, "unpaired") and (key != "kl_shift_chunk" or value == 0),
                f"data.{key}={value!r} is for unpaired losses ({takers}), not loss.type {names}",
                f"data.{key}",
                "loss.type",
            )
    elif specs and not any(spec.kl_sequences for spec in specs):
        takers = ", ".join(n for n, spec in losses.LOSSES.items() if spec.kl_sequences)
        problems.require(
            cfg.data.kl_shift_chunk == 0,
            f"data.kl_shift_chunk={cfg.data.kl_shift_chunk} chooses KL sequences, which loss.type {names} "
            f"has none of (a KL term: {takers})",
            "data.kl_shift_chunk",
            "loss.type",
        )
    losses.check_reference_mode(cfg.loss, cfg.reference.mode, problems)
    t = cfg.training
    mode = FORWARD_MODES.get(t.forward_mode)
    if mode is None:
        known = " | ".join(f'"{n}"' for n in FORWARD_MODES)
        problems.add(
            "training.forward_mode",
            f"training.forward_mode: expected one of {known}, got {t.forward_mode!r}"
            + did_you_mean(t.forward_mode, FORWARD_MODES),
            failed=True,
        )
    padding_free = [n for n, m in FORWARD_MODES.items() if m.padding_free]
    problems.require(
        not t.micro_batch_tokens or mode is None or mode.padding_free,
        f"training.micro_batch_tokens: token budgets need forward_mode {' or '.join(padding_free)} "
        f"(a padded mode's cost is set by its longest row), got {t.forward_mode!r}",
        "training.micro_batch_tokens",
        "training.forward_mode",
    )


# ----------------------------------------------------------------------------------------------
# Writing the resolved recipe back out as TOML


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: Config) -> str:
    """The fully resolved recipe, loadable again with `load_config`."""
    lines = []
    for table, values in dataclasses.asdict(cfg).items():
        lines.append(f"[{table}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)


def reference_doc() -> str:
    """Markdown reference of every recipe table and key, generated from the dataclasses."""
    out = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for table, cls in typing.get_type_hints(Config).items():
        docs = field_docs(cls)
        defaults = dataclasses.asdict(cls())
        for name, tp in typing.get_type_hints(cls).items():
            default = toml_value(defaults[name])
            meaning, kind = docs[name], _type_name(tp)
            if f"{table}.{name}" == "training.forward_mode":
                kind = " | ".join(f'"{n}"' for n in FORWARD_MODES)
                meaning += "".join(f" `{n}`: {mode.doc}" for n, mode in FORWARD_MODES.items())
            out.append(f"| `{table}.{name}` | {kind} | `{default}` | {meaning} |")
    return "\n".join(out)


if __name__ == "__main__":
    if sys.argv[1:] == ["--doc"]:
        print(reference_doc())
    else:
        print("usage: python -m engine.recipe --doc", file=sys.stderr)
        sys.exit(2)
