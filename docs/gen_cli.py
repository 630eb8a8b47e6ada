"""Write docs/reference/cli.md from the Typer app: every command, its docstring and every option with its help
text and default. `tests/test_docs.py` fails when the committed page differs from what this writes.

    python docs/gen_cli.py
"""

from __future__ import annotations

import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parent / "reference" / "cli.md"


def render() -> str:
    import typer

    from vae_engine.cli import app

    group = typer.main.get_command(app)
    lines = ["# CLI reference", "", "Every `vae-engine` command and option, generated from the commands themselves "
             "(`python docs/gen_cli.py`; the same text as `--help`).", ""]
    for name, command in group.commands.items():
        lines += [f"## `vae-engine {name}`", "", " ".join((command.help or "").split()), ""]
        rows = []
        for p in command.params:  # Typer's own copy of click: told apart by param_type_name, not click's classes
            kind = p.type.name
            text = " ".join((getattr(p, "help", "") or "").split())
            if p.param_type_name == "argument":
                rows.append((p.name.upper(), kind, text, ""))
            elif p.param_type_name == "option" and p.name != "help":
                default = "" if p.default is None or p.is_flag and p.default is False else str(p.default)
                rows.append((", ".join(p.opts), kind, text, default))
        if rows:
            lines += ["| option | type | what it does | default |", "| --- | --- | --- | --- |"]
            for option, kind, text, default in rows:
                text, default = text.replace("|", "\\|"), f"`{default}`" if default else ""
                lines.append(f"| `{option}` | {kind} | {text} | {default} |")
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    PAGE.write_text(render())
    sys.stdout.write(f"wrote {PAGE}\n")
