"""Field tools: the `prapa` CLI, the virtual board, image building and site simulation."""
