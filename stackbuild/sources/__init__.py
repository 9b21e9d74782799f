"""Fetching pinned sources into the cache: PyPI sdists, git repositories, local paths."""
