"""CLI stage: parse arguments, call the library, print. Nothing imports this package."""
