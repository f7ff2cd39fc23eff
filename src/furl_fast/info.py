"""`python -m furl_fast.info`: print what furl_fast was built with and what it can use here."""

from __future__ import annotations

from furl_fast import build_info


def main() -> None:
    info = build_info()
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
