"""``./dev bench [runtime|enqueue|all|w1|w2|w3|w4|w5|pgbench|peers|chaos] [args]``: run benchmarks
and print markdown tables (see bench/README.md)."""

import sys

NAMES = ("runtime", "enqueue", "all", "w1", "w2", "w3", "w4", "w5", "pgbench", "peers",
         "chaos")


def main() -> None:
    args = sys.argv[1:]
    name = args.pop(0) if args and not args[0].startswith("-") else "runtime"
    if name == "runtime":
        from bench import runtime

        runtime.main(args)
    elif name == "enqueue":
        from bench import enqueue

        enqueue.main(args)
    elif name == "all":
        from bench import suite

        suite.main(args)
    elif name in ("w1", "w2", "w3", "w4", "w5", "pgbench"):
        from bench import suite

        suite.main(args, only=name)
    elif name == "chaos":
        from bench import chaos

        chaos.main(args)
    elif name == "peers":
        from bench import suite

        suite.peers_main(args)
    else:
        raise SystemExit(f"unknown benchmark {name!r}; available: {', '.join(NAMES)}")


main()
