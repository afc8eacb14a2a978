"""Analysis: statistics, comparisons, probes and pictures of stored runs (reads through storage only)."""
