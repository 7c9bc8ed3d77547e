"""Print the configuration reference (Markdown) generated from the settings classes.

README.md embeds this output between the `settings:begin` / `settings:end` markers;
tests/test_docs.py fails when the two drift apart. Regenerate with:
    python scripts/settings_doc.py --write
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from pydantic_settings import BaseSettings

from server.settings import ServerSettings
from sim.platform_settings import SimulateSettings
from streams.kafka import KafkaSettings
from streams.worker import WorkerSettings

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


def table(cls: type[BaseSettings]) -> str:
    prefix = cls.model_config.get("env_prefix", "")
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in cls.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseSettings):
            continue  # nested settings (the server's Kafka): their own table, their own prefix
        alias = field.validation_alias
        env = getattr(alias, "choices", [None])[0] if alias is not None else f"{prefix}{name.upper()}"
        default = field.default
        if hasattr(default, "get_secret_value"):
            default = default.get_secret_value()
        shown = "—" if default in (None, "", ()) else f"`{default}`"
        rows.append(f"| `{env}` | {shown} | {field.description or ''} |")
    return "\n".join(rows)


def render() -> str:
    return (
        f"{BEGIN}\n### `authopt serve`\n\n{table(ServerSettings)}\n\n"
        f"### `authopt worker`\n\n{table(WorkerSettings)}\n\n"
        f"### Kafka (every process)\n\n{table(KafkaSettings)}\n\n"
        f"### `authopt simulate` (the traffic `authopt up` plays too)\n\n{table(SimulateSettings)}\n{END}"
    )


def main() -> None:
    text = render()
    if "--write" in sys.argv:
        readme = README.read_text()
        README.write_text(
            re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: text, readme, flags=re.S)
        )
    else:
        print(text)


if __name__ == "__main__":
    main()
