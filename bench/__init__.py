"""Benchmarks of alignpipe against what a user would do instead, run by ``make bench``.

They measure and report; they never pass or fail. The method is in the project's benchmark notes:
paired runs in one session, whole processes for memory, the same work on both sides.
"""
