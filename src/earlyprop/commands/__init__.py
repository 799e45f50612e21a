"""Command-line subcommands; each module exposes ``add_parser(subparsers)`` and ``run(args) -> int``.

Register a new command by adding its module name to ``earlyprop.cli.COMMANDS``.
"""
