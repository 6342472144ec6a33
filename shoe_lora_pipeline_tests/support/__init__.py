"""Helpers of the tests (plain modules, no tests): imported by the test modules, or run by them in a
subprocess (``faulty_train``, ``rank_dies``)."""
