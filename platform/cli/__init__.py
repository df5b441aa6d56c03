"""The `plora` command line: thin click commands over the platform, one module per command group."""
