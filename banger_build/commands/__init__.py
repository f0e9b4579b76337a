"""One module per subcommand. Each defines ``NAME``, ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``; ``banger_build.cli`` lists them in ``COMMANDS``.

Shared option groups live in ``common``. Heavy imports happen inside ``run``
so that ``banger-build --help`` and cache hits stay fast.
"""
