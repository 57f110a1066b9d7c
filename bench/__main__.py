"""``./dev bench [runtime] [args]``: run a benchmark and print a markdown table."""

import sys


def main() -> None:
    args = sys.argv[1:]
    name = args.pop(0) if args and not args[0].startswith("-") else "runtime"
    if name == "runtime":
        from bench import runtime

        runtime.main(args)
    elif name == "enqueue":
        from bench import enqueue

        enqueue.main(args)
    else:
        raise SystemExit(f"unknown benchmark {name!r}; available: runtime, enqueue")


main()
