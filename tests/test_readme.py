"""The README's two set-up commands are the ones CI and the demo test run."""

from conftest import ROOT


def readme_command(kind: str) -> str:
    """The line under the README's `<!-- kind-command -->` marker (inside a bash block)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(f"<!-- {kind}-command -->")
    return next(line for line in lines[start + 1 :] if line and not line.startswith("```"))


def test_ci_runs_exactly_the_readme_test_command():
    command = readme_command("test")
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci


def test_readme_demo_command_sets_up_and_runs_the_demo():
    command = readme_command("demo")
    assert command.startswith("python -m pip install -r requirements.txt") and command.endswith(
        "python cli.py demo"
    )
