"""One module per subcommand of ``sid`` (sid/cli.py): each has ``main(argv, prog) -> exit code``."""
