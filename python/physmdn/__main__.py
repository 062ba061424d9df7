"""``python -m physmdn info`` prints the build facts; other commands go to the ``physmdn`` CLI."""

import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["info"]:
        import physmdn

        for key, value in physmdn.build_info().items():
            print(f"{key:16s} {value}")
        return 0
    try:
        from .cli import main as cli_main
    except ImportError:
        print("usage: python -m physmdn info", file=sys.stderr)
        return 2
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
