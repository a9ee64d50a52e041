"""The validation study of the demo (issue 21 items 3-9): maps, experiments, report."""
