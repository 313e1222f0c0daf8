"""The `aaclip` command line: a thin Typer face over `aaclip_core`."""
