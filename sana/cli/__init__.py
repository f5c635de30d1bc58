"""Command line: `sana <command>`. Each command is a small module: add_arguments(parser) and run(args)."""
