"""Study data on disk: responses, feature caches, readouts."""
