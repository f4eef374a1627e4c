"""`python -m lors_fast ...` == the `lors-fast` command (the CLI is imported only when run this way)."""


def _run() -> None:
    """Import the click app lazily (the library never imports the CLI) and run it."""
    from lors_fast.cli import main

    main(prog_name="lors-fast")


if __name__ == "__main__":
    _run()
