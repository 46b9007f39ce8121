"""What every name in the stand-ins below is: a function that says so when called."""


def not_installed(*args, **kwargs):
    raise RuntimeError("a stand-in from tests/frameworks/stubs (see README.md) was called")
