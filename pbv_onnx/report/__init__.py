"""What people look at: pair figures, response panels, the HTML report."""
