"""The ``rlsubnet`` command line: one entry point, one small module per subcommand."""
