"""nestprune's command-line interface: thin typer commands over the ``nestprune`` library."""
