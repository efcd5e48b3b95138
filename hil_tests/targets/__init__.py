"""One module per HIL target; each gives `open_board(options, **wishes) -> BoardHandle`."""
