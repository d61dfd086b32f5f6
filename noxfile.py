"""Developer sessions: tests, lint, bench. Every session installs the CPU build of torch first."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests"]
# The exact release: a range would let pip pick a newer multi-GB CUDA build.
TORCH = "torch==2.13.0"


def install(session: nox.Session, extras: str = "test") -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the default test suite (slow tests excluded); pass `-- -m slow` for the slow ones."""
    install(session)
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check style with ruff."""
    session.install("ruff")
    session.run("ruff", "check", "planner", "tests", "benchmarks")


@nox.session
def bench(session: nox.Session) -> None:
    """Run every benchmark (tables in benchmarks/results/, plots in docs/img/); pass `-- --quick` for a short check."""
    install(session, "bench")
    session.run("python", "benchmarks/run_all.py", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Regenerate the reference pages, then build the guide into site/; any MkDocs warning fails it."""
    session.install(TORCH)
    session.install("-e", ".")
    session.install("mkdocs>=1.6,<2")  # 1.6 added the not_in_nav and validation settings mkdocs.yml uses
    session.run("python", "docs/generate.py")
    session.run("mkdocs", "build", "--strict")
