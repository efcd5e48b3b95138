# What protocol/ needs from MicroPython, with CPython stand-ins. MicroPython's
# compiler folds X = const(...) by the name `const`, wherever it came from.
try:
    from micropython import const
except ImportError:   # CPython: the gateway and tests
    def const(x):
        return x
