"""prapa site: a simulated site (grows as the gateway and tools land)."""


def add_parser(sub):
    p = sub.add_parser("site", help="run a simulated site")
    p.set_defaults(func=lambda a: 0)
