"""CLI start-up: `rumi --help` and `rumi grants` against a minimal two-command typer app, in one run.

    python bench/cli.py [--runs 21]

Each command runs as its own process with this interpreter (median of `--runs` wall-clock times,
interleaved, after one warm-up run each that leaves the bytecode cached). The baseline is a typer app with two
commands and nothing else (`python <tmp>/minimal.py --help`); `rumi` is the console script beside
the interpreter (else `python -m broker.cli`); `rumi grants` reads the grant files of a workspace
made by `rumi init` in a temporary directory. Prints the medians and the ratios to the baseline
(target: both <= 1.5).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MINIMAL = """
import typer

app = typer.Typer()


@app.command()
def hello(name: str) -> None:
    print(f"hello {name}")


@app.command()
def bye(name: str) -> None:
    print(f"bye {name}")


if __name__ == "__main__":
    app()
"""


def rumi_argv() -> list[str]:
    """The installed `rumi` beside this interpreter, else the module."""
    script = Path(sys.executable).parent / "rumi"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "broker.cli"]


def timed(argv: list[str], env: dict[str, str]) -> float:
    """Wall-clock seconds of one run of `argv`; exits with its stderr when it fails."""
    started = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, check=False)
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21, help="measured runs per command (default 21)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rumi-bench-cli-") as tmp:
        minimal = Path(tmp) / "minimal.py"
        minimal.write_text(MINIMAL)
        ws = Path(tmp) / "ws"
        env = {**os.environ, "RUMI_ROOT": str(ws), "TERM": "dumb", "COLUMNS": "100"}
        rumi = rumi_argv()
        subprocess.run([*rumi, "init"], stdout=subprocess.DEVNULL, env=env, check=True)
        subprocess.run(
            [*rumi, "grant", "default:tool:my_tool", "env_read", "--key", "HOME"],
            stdout=subprocess.DEVNULL,
            env=env,
            check=True,
        )
        cases = [
            ("minimal typer app --help", [sys.executable, str(minimal), "--help"]),
            ("rumi --help", [*rumi, "--help"]),
            ("rumi grants", [*rumi, "grants"]),
        ]
        for _, argv in cases:  # warm-up: bytecode written, files in the page cache
            timed(argv, env)
        # Interleaved: drift in the machine's load hits every command alike.
        samples: dict[str, list[float]] = {name: [] for name, _ in cases}
        for _ in range(args.runs):
            for name, argv in cases:
                samples[name].append(timed(argv, env))
    medians = {name: statistics.median(times) for name, times in samples.items()}
    base = medians["minimal typer app --help"]
    print(f"python {sys.version.split()[0]}, {args.runs} runs per command, rumi = {' '.join(rumi)}")
    for name, seconds in medians.items():
        print(f"{name:<26} {seconds * 1000:7.1f} ms   {seconds / base:4.2f}x")


if __name__ == "__main__":
    main()
