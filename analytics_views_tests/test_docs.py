"""The README's and docs/'s code blocks say what works (issue 22): every `analytics-views` command in them is one
the command accepts, every defs.yaml and defs.yaml fragment is one the component accepts, every file the README's
layout names exists, every other program they run is installed, and every attribute of the component is in the
defs.yaml reference. (The translator and component examples of docs/adopting.md run in
orchestration/test_translator.py; the two README commands run in CI itself.)
"""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from analytics_views.operations.cli import build_parser
from analytics_views.orchestration.component import MaterializedViewsComponent
from analytics_views.paths import PROJECT_ROOT

DOCUMENTS = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
COMPONENT_TYPE = "analytics_views.MaterializedViewsComponent"


def blocks(language: str) -> list[tuple[str, str]]:
    """Every fenced block of `language` ("" for none): (where, its text)."""
    found = []
    for document in DOCUMENTS:
        for number, match in enumerate(re.finditer(r"^```(\w*)\n(.*?)^```", document.read_text(), re.S | re.M)):
            if match[1] == language:
                found.append((f"{document.relative_to(PROJECT_ROOT)} block {number + 1}", match[2]))
    return found


def commands(text: str) -> list[list[str]]:
    """The shell commands of a block: comments, heredocs and `export` lines left out, `&&` chains split."""
    text = re.sub(r"<<'(\w+)'\n.*?^\1$", "", text, flags=re.S | re.M)
    found = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if not words or words[0] in ("export", "cat"):
            continue
        command: list[str] = []
        for word in [*words, "&&"]:
            if word == "&&":
                found.append(command)
                command = []
            else:
                command.append(word)
    return [command for command in found if command]


# What ./bootstrap installs into .venv/bin (pyproject.toml's dependencies), when the tests run from elsewhere.
INSTALLED_BY_BOOTSTRAP = {"analytics-views", "dagster-webserver", "dagster-daemon", "pytest", "dg", "dagster"}


SHELL_COMMANDS = [(where, command) for where, text in blocks("sh") for command in commands(text)]


@pytest.mark.parametrize(("where", "command"), SHELL_COMMANDS, ids=[f"{w}: {' '.join(c)[:60]}" for w, c in SHELL_COMMANDS])
def test_every_command_in_the_docs_is_one_that_exists(where, command):
    program = command[0]
    if program.endswith("analytics-views"):
        build_parser().parse_args(command[1:])  # argparse exits on anything the command would refuse
    elif program == ".venv/bin/python":
        assert command[1] == "-m" or (PROJECT_ROOT / command[1]).is_file(), where
        if command[1] == "-m":
            module = command[2]
            assert (PROJECT_ROOT / Path(*module.split("."))).with_suffix(".py").is_file(), f"{where}: {module}"
    elif program.startswith(".venv/bin/"):
        assert (PROJECT_ROOT / program).is_file() or program.removeprefix(".venv/bin/") in INSTALLED_BY_BOOTSTRAP, where
    else:
        assert (PROJECT_ROOT / program).is_file(), f"{where}: {program}"


YAML_BLOCKS = blocks("yaml")


@pytest.mark.parametrize(("where", "text"), YAML_BLOCKS, ids=[where for where, _ in YAML_BLOCKS])
def test_every_defs_yaml_in_the_docs_is_one_the_component_accepts(where, text, tmp_path):
    document = yaml.safe_load(text)
    if document.get("type") != COMPONENT_TYPE:  # a fragment of attributes:, shown indented as it sits there
        document = {"type": COMPONENT_TYPE, "attributes": {"schemas": ["public"], **document}}
    # Where the project's own defs.yaml sits, so that its relative sql_folder finds the project's views.
    defs_yaml = tmp_path / "analytics_views" / "orchestration" / "defs" / "views" / "defs.yaml"
    defs_yaml.parent.mkdir(parents=True)
    (tmp_path / "sql").symlink_to(PROJECT_ROOT / "sql")
    defs_yaml.write_text(yaml.safe_dump(document))
    component = MaterializedViewsComponent.from_defs_yaml(defs_yaml)
    component.managed_config()  # cadences, patterns and settings checked as the definitions would


def test_every_file_the_readme_layout_names_exists():
    (layout,) = [text for where, text in blocks("") if "analytics_views/" in text and where.startswith("README")]
    names = set(re.findall(r"\b[\w/.-]+\.(?:py|sql|yaml|md)\b", layout))
    top_level = {line.split()[0] for line in layout.splitlines() if line and not line[0].isspace()}
    files = [
        "/" + str(path.relative_to(PROJECT_ROOT))
        for top in PROJECT_ROOT.iterdir()
        if not top.name.startswith(".")
        for path in ([top] if top.is_file() else top.rglob("*"))
    ]
    missing = sorted(name for name in names if not any(file.endswith("/" + name) for file in files))
    missing += sorted(name for name in top_level - {".cache/"} if not (PROJECT_ROOT / name).exists())
    assert not missing, missing


def attribute_paths(model, prefix: str = "") -> list[str]:
    """Every attribute of a component model, nested models' as `parent.child`."""
    paths = []
    for name, field in model.model_fields.items():
        if name == "defs_state":  # Dagster's own attribute of a state-backed component
            continue
        paths.append(f"{prefix}{name}")
        for candidate in models_in(field.annotation):
            paths += attribute_paths(candidate, f"{prefix}{name}.")
    return paths


def models_in(annotation) -> list:
    """The models an annotation holds: itself, or those of its unions, lists and dicts' values."""
    if isinstance(annotation, type) and getattr(annotation, "model_fields", None):
        return [annotation]
    return [model for arg in getattr(annotation, "__args__", ()) for model in models_in(arg)]


@pytest.mark.parametrize("attribute", attribute_paths(MaterializedViewsComponent))
def test_every_attribute_of_the_component_is_in_the_defs_yaml_reference(attribute):
    """The reference a team configures from (docs/adopting.md, the project's defs.yaml and docs/notifications.md)
    names every attribute the component takes."""
    reference = "\n".join(
        path.read_text()
        for path in (
            PROJECT_ROOT / "docs" / "adopting.md",
            PROJECT_ROOT / "docs" / "notifications.md",
            PROJECT_ROOT / "analytics_views" / "orchestration" / "defs" / "views" / "defs.yaml",
        )
    )
    name = re.escape(attribute.rsplit(".", 1)[-1])
    assert re.search(rf"\b{name}\s*:|`{name}`", reference), f"{attribute} is in no reference: describe it there"
