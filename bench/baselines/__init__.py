"""Small baseline servers the benchmark compares the real server against."""
