"""`merge-distill zoo ...`: the toy world's commands, mounted on the command line by its extension
(`merge_distill.toyworld.extension`)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

zoo_app = typer.Typer(no_args_is_help=True, help="The CPU expert zoo (tiny models this project trains itself).")


@zoo_app.command("build")
def zoo_build(preset: Annotated[str, typer.Option(help="default, hard, three, hack or smoke")] = "default",
              seed: int = 0,
              members: Annotated[Optional[list[str]], typer.Option("--member", help="only these (e.g. large_math_expert)")] = None,
              directory: Annotated[Optional[str], typer.Option("--dir", help="where (default: the cache)")] = None,
              isolation: Annotated[Optional[str], typer.Option(
                  help="how model-written code is isolated: bubblewrap (the default; nothing runs where it is "
                       "missing) or rlimits (your opt-out: no namespaces, programs can read your files and reach "
                       "the network)")] = None):
    """Build (or reuse) the CPU expert zoo: data, base, and RL experts."""
    from merge_distill.cli import _guard, _isolation, console, progress_bar  # the CLI's own helpers

    def body():
        from merge_distill.graders import sandbox_level
        from merge_distill.toyworld.zoo import Zoo

        level = _isolation(isolation) or "bubblewrap"
        with progress_bar() as progress:
            z = Zoo(preset, seed, directory, progress=progress, log=console.print, isolation=level)
            sandbox_level(z.graders_to_build(members), level)  # the code expert's GRPO grades code
            z.ensure(members)
        console.print(f"zoo ready: {z.dir}")

    _guard(body)
