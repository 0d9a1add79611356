"""Results: what a sweep left on disk, selected, exported and rendered. No Ray at import time."""
