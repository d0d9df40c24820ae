"""Edit the YAML a cluster is deployed from in place: only the lines of values that change.

``ephemera tune --write`` changes one deployment's ``user_config`` (and its derived
``max_ongoing_requests``) in a Serve config file, in the Serve config a KubeRay RayService
embeds as the block string ``spec.serveConfigV2``, and in the ``batching.yaml`` the file
is generated from. A YAML round trip would drop the operators' comments and reflow the
file (PyYAML keeps neither), so the edit is textual: each changed value is replaced on its
own line, keeping the key, its indentation and any trailing comment; a key the file lacks
is added at the end of its block. Every edit is then checked by parsing the result against
the intended values; anything this cannot place (flow or anchored structures it does not
find) is refused with a message saying what to edit by hand, and nothing is written.

Block-style YAML as ``yaml.safe_dump`` and ``ephemera deploy-config`` write it is
assumed: one key per line, list items ``- name: X`` with ``name`` first.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_KEY = re.compile(r"^(?P<indent> *)(?P<dash>- )?(?P<key>[A-Za-z_][\w.-]*):(?P<rest>.*)$")


@dataclass(frozen=True, slots=True)
class FileEdit:
    """One file's text before and after an edit; ``shown`` is the name diffs print."""

    path: Path
    shown: str
    before: str
    after: str

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def diff(self) -> str:
        """A unified diff (``a/NAME``, ``b/NAME``), as ``git diff`` prints it."""
        return "".join(difflib.unified_diff(
            self.before.splitlines(keepends=True), self.after.splitlines(keepends=True),
            fromfile=f"a/{self.shown}", tofile=f"b/{self.shown}"))


def scalar_text(value: Any) -> str:
    """``value`` as YAML writes it on one line: 24, 100.0, true, or a flow mapping."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 20)
    return text.removesuffix("\n...\n").strip()


def changed_values(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``new`` whose values differ from ``old``'s, nested mappings by key
    (a key ``new`` drops cannot be edited away: the caller's check refuses it)."""
    out: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            inner = changed_values(before, value)
            if inner:
                out[key] = inner
        elif key not in old or before != value:
            out[key] = value
    return out


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_content(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def _block_end(lines: list[str], start: int, hi: int, indent: int) -> int:
    """The end of the block that begins at ``start``: the next content line indented
    ``indent`` or less (or ``hi``)."""
    for i in range(start + 1, hi):
        if _is_content(lines[i]) and _indent(lines[i]) <= indent:
            return i
    return hi


def _last_content(lines: list[str], lo: int, hi: int) -> int:
    """Where a line appended to the block [lo, hi) goes: after its last content line."""
    end = hi
    while end > lo + 1 and not _is_content(lines[end - 1]):
        end -= 1
    return end


def find_item(lines: list[str], lo: int, hi: int, name: str, where: str) -> tuple[int, int, int]:
    """The list item ``- name: NAME`` within [lo, hi): (first line, end, indent of its
    keys). Exactly one must exist; ``where`` names the file in the error."""
    found = []
    for i in range(lo, hi):
        m = _KEY.match(lines[i])
        if m and m["dash"] and m["key"] == "name" and m["rest"].split("#")[0].strip() \
                .strip("'\"") == name:
            found.append(i)
    if len(found) != 1:
        raise ValueError(f"{where}: expected one `- name: {name}` item, found {len(found)}; "
                         "edit the file by hand or regenerate it with `ephemera deploy-config`")
    i = found[0]
    dash = _indent(lines[i])
    return i, _block_end(lines, i, hi, dash), dash + 2


def set_values(lines: list[str], lo: int, hi: int, indent: int, values: dict[str, Any],
               where: str) -> int:
    """Set ``values`` (nested mappings by key) in the mapping whose keys sit at ``indent``
    within lines [lo, hi); returns how many lines were inserted. A mapping the file writes
    in flow style (``key: {a: 1}``) is rewritten whole on its line."""
    inserted = 0
    for key, value in values.items():
        row = next((i for i in range(lo, hi) if (m := _KEY.match(lines[i]))
                    and len(m["indent"]) + (2 if m["dash"] else 0) == indent
                    and m["key"] == key), None)
        if row is None:
            if isinstance(value, dict):
                raise ValueError(f"{where}: no `{key}:` mapping to edit; add it by hand")
            at = _last_content(lines, lo, hi)
            lines.insert(at, f"{' ' * indent}{key}: {scalar_text(value)}")
            hi += 1
            inserted += 1
            continue
        m = _KEY.match(lines[row])
        assert m is not None
        inline, _, comment = m["rest"].partition(" #")
        if isinstance(value, dict) and not inline.strip():
            end = _block_end(lines, row, hi, indent)
            child = next((_indent(line) for line in lines[row + 1:end] if _is_content(line)),
                         indent + 2)
            added = set_values(lines, row + 1, end, child, value, where)
            hi += added
            inserted += added
            continue
        if isinstance(value, dict):  # a flow mapping: write the whole mapping back
            value = {**yaml.safe_load(inline), **value}
        prefix = lines[row][:len(lines[row]) - len(m["rest"])]
        spacing = inline[:len(inline) - len(inline.lstrip())] or " "
        new = scalar_text(value)
        if comment:  # keep the comment in its column where the new value leaves room
            pad = max(0, len(inline.strip()) + len(inline) - len(inline.rstrip()) - len(new))
            new += " " * pad + " #" + comment
        lines[row] = f"{prefix}{spacing}{new}"
    return inserted


def serve_config_region(lines: list[str], where: str) -> tuple[int, int]:
    """Lines [lo, hi) holding a RayService's ``serveConfigV2`` block string."""
    for i, line in enumerate(lines):
        m = _KEY.match(line)
        if m and m["key"] == "serveConfigV2":
            if not re.fullmatch(r"\s*\|[-+]?\s*(#.*)?", m["rest"]):
                raise ValueError(f"{where}: spec.serveConfigV2 is not a `|` block string; "
                                 "edit it by hand")
            return i + 1, _block_end(lines, i, len(lines), _indent(line))
    raise ValueError(f"{where}: a RayService without spec.serveConfigV2")


def edit_deployment(text: str, app_name: str, deployment: str, values: dict[str, Any],
                    where: str, *, ray_service: bool) -> str:
    """``text`` (a Serve config, or a RayService manifest when ``ray_service``) with
    ``values`` set in ``deployment`` of app ``app_name``."""
    lines = text.split("\n")
    lo, hi = serve_config_region(lines, where) if ray_service else (0, len(lines))
    app_lo, app_hi, _ = find_item(lines, lo, hi, app_name, where)
    start, end, indent = find_item(lines, app_lo, app_hi, deployment, where)
    set_values(lines, start, end, indent, values, where)
    return "\n".join(lines)


def edit_mapping(text: str, values: dict[str, Any], where: str) -> str:
    """``text``, a YAML mapping file, with ``values`` (nested by key) set."""
    lines = text.split("\n")
    set_values(lines, 0, len(lines), 0, values, where)
    return "\n".join(lines)


def replace_app(serve_config: dict[str, Any], app: dict[str, Any]) -> dict[str, Any]:
    """A copy of a Serve config with the application of ``app``'s name replaced."""
    out = copy.deepcopy(serve_config)
    out["applications"] = [app if a.get("name") == app["name"] else a
                           for a in out["applications"]]
    return out


def read_deployed(text: str, where: str) -> tuple[Any, dict[str, Any], bool]:
    """(the document, the Serve config in it, whether it is a RayService manifest)."""
    doc = yaml.safe_load(text)
    ray_service = isinstance(doc, dict) and doc.get("kind") == "RayService"
    serve_config = doc
    if ray_service:
        embedded = (doc.get("spec") or {}).get("serveConfigV2")
        serve_config = yaml.safe_load(embedded) if isinstance(embedded, str) else None
    if not isinstance(serve_config, dict) or not isinstance(
            serve_config.get("applications"), list):
        raise ValueError(f"{where} is neither a Serve config (ServeDeploySchema, with "
                         "applications:) nor a RayService manifest with spec.serveConfigV2")
    return doc, serve_config, ray_service


def with_serve_config(doc: Any, serve_config: dict[str, Any], ray_service: bool) -> Any:
    """``doc`` with its Serve config replaced by a parsed one (for comparing)."""
    if not ray_service:
        return serve_config
    out = copy.deepcopy(doc)
    out["spec"]["serveConfigV2"] = serve_config
    return out


def check_parses_to(text: str, expected: Any, where: str, *, ray_service: bool = False) -> None:
    """Refuse an edit whose result does not parse to exactly ``expected`` (for a
    RayService, with its serveConfigV2 string parsed too)."""
    try:
        got = yaml.safe_load(text)
        if ray_service:
            got = with_serve_config(got, yaml.safe_load(got["spec"]["serveConfigV2"]), True)
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        got = exc
    if got != expected:
        raise ValueError(f"{where}: could not edit the file in place (its layout is not the "
                         "block style `ephemera deploy-config` writes); nothing was written: "
                         "edit it by hand")
