#!/usr/bin/env python3
"""Write .env.example and docs/configuration.md from the settings declared in mds_grpc/config.py.

Usage: gen_settings_docs.py [OUT_DIR]  (default: the repository root; `make settings-docs`)
"""

import sys
import textwrap
from dataclasses import Field, fields
from itertools import groupby
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mds_grpc.config import RENAMED, GiB, Group, MiB, Settings, env_name  # noqa: E402

GENERATED = "Generated from mds_grpc/config.py by `make settings-docs`: edit the settings there."
PRECEDENCE = (
    "Real environment variables win over .env, and a flag wins over both: each setting is also a flag "
    "of `mds serve`, `mds worker`, `mds gc` and `mds keys` (`MDS_GRPC_PORT` is `--grpc-port`). "
    "An empty value means the default."
)


def _groups() -> list[tuple[Group, list[Field]]]:
    """The settings by group, in the order config.py declares them."""
    for f in fields(Settings):
        if "doc" not in f.metadata:
            raise SystemExit(f"error: Settings.{f.name} has no meaning: declare it with setting(default, doc, group)")
    groups = [(group, list(members)) for group, members in groupby(fields(Settings), lambda f: f.metadata["group"])]
    if len({group for group, _ in groups}) < len(groups):
        raise SystemExit("error: declare each group's settings together in mds_grpc/config.py")
    return groups


def _text(value) -> str:
    """A default as it is written in the environment."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, 100, initial_indent="# ", subsequent_indent="# ")


def env_example() -> str:
    lines = [
        *_comment("MDS settings. Copy to .env (read from the working folder or above) or export them. " + PRECEDENCE),
        *_comment(GENERATED),
    ]
    for group, members in _groups():
        lines += ["", f"# --- {group.title} ---", *_comment(group.intro), ""]
        for f in members:
            shown = f.metadata["shown"]
            lines += [
                *_comment(f.metadata["doc"] + (f" Empty: {shown}." if shown else "")),
                f"{env_name(f.name)}={'' if shown else _text(f.default)}",
            ]
    return "\n".join(lines) + "\n"


def _default_cell(f: Field) -> str:
    if f.metadata["shown"]:
        return f.metadata["shown"]
    text = _text(f.default)
    if not text:
        return "empty"
    for unit, unit_name in ((GiB, "GiB"), (MiB, "MiB")):
        if f.name.endswith("_bytes") and isinstance(f.default, int) and f.default % unit == 0:
            return f"`{text}` ({f.default // unit} {unit_name})"
    return f"`{text}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference() -> str:
    lines = [
        f"<!-- {GENERATED} -->",
        "",
        "# Configuration",
        "",
        "MDS reads its settings from `MDS_*` environment variables and from a `.env` file, found from the "
        "working folder up (`.env.example` lists every setting with its default). " + PRECEDENCE,
    ]
    for group, members in _groups():
        lines += ["", f"## {group.title}", "", group.intro, "", "| variable | default | meaning |", "|---|---|---|"]
        lines += [f"| `{env_name(f.name)}` | {_default_cell(f)} | {_cell(f.metadata['doc'])} |" for f in members]
    lines += [
        "",
        "## Renamed settings",
        "",
        "The old names still work and log a deprecation warning; the new name wins when both are set.",
        "",
        "| old name | new name |",
        "|---|---|",
    ]
    lines += [
        f"| `{env_name(old)}`, `{_flag(old)}` | `{env_name(new)}`, `{_flag(new)}` |" for old, new in RENAMED.items()
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO
    (out / "docs").mkdir(parents=True, exist_ok=True)
    (out / ".env.example").write_text(env_example())
    (out / "docs" / "configuration.md").write_text(reference())


if __name__ == "__main__":
    main()
