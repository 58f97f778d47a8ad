"""Corpora that need no download: for the demo, the tests and benchmarks.

    python -m data_tools.sample_corpus synthetic --output corpus.txt --num-docs 2000
    python -m data_tools.sample_corpus stdlib --output corpus.txt

* ``synthetic``: documents with learnable structure. Each document has a topic; its
  sentences follow a small grammar whose nouns and verbs come from the topic's word list,
  and consecutive sentences continue a story (the object of one is the subject of the
  next). So masked words are predictable from context, and a true next sentence is
  distinguishable from a random one: a tiny BERT learns both within a few hundred steps.
* ``stdlib``: real English prose, the docstrings of Python's standard library (one
  document per module), present on every machine that runs this code.

Both write documents separated by blank lines, one paragraph per line.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import random
import sys
import warnings
from pathlib import Path

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"
_ADJECTIVES = ["small", "large", "red", "quiet", "bright", "old", "young", "happy", "dark", "quick"]
_PLACES = ["in the garden", "near the river", "at the market", "on the hill", "under the bridge", "by the sea"]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def synthetic_documents(num_docs: int, seed: int = 0, num_topics: int = 20, sentences_per_doc: tuple[int, int] = (4, 12)) -> list[str]:
    rng = random.Random(seed)
    # every topic owns its nouns, verbs, adjectives and places: each word of a sentence
    # tells its topic, which is what makes a random next sentence recognisable
    topics = [
        {
            "nouns": [_word(rng, 2) for _ in range(6)],
            "verbs": [_word(rng, 2) + "s" for _ in range(4)],
            "adjectives": rng.sample(_ADJECTIVES, 3),
            "places": rng.sample(_PLACES, 2),
        }
        for _ in range(num_topics)
    ]
    docs = []
    for _ in range(num_docs):
        topic = rng.choice(topics)
        subject = rng.choice(topic["nouns"])
        sentences = []
        for _ in range(rng.randint(*sentences_per_doc)):
            obj = rng.choice([n for n in topic["nouns"] if n != subject])
            verb = rng.choice(topic["verbs"])
            adjective = rng.choice(topic["adjectives"])
            place = rng.choice(topic["places"])
            sentences.append(f"The {adjective} {subject} {verb} the {obj} {place}.")
            subject = obj  # the story continues from the object: what makes a true next sentence
        docs.append(" ".join(sentences))
    return docs


def stdlib_documents(max_docs: int = 0) -> list[str]:
    """Module, class and function docstrings of the standard library, one document per module."""
    docs = []
    names = sorted(m.name for m in pkgutil.iter_modules() if not m.name.startswith("_") and m.module_finder.path.startswith(sys.base_prefix))
    for name in names:
        if name in ("antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle", "test", "ensurepip", "lib2to3", "pydoc_data"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except BaseException:  # some modules refuse to import on this platform
            continue
        paragraphs = []
        for obj in [module] + [v for _, v in sorted(vars(module).items()) if inspect.isclass(v) or inspect.isfunction(v)]:
            if getattr(obj, "__module__", name) != name and obj is not module:
                continue
            doc = inspect.getdoc(obj)
            if doc:
                # a docstring's paragraphs are separated by blank lines; join wrapped lines
                paragraphs += [" ".join(p.split()) for p in doc.split("\n\n") if p.strip()]
        if len(paragraphs) >= 2:
            docs.append("\n".join(paragraphs))
        if max_docs and len(docs) >= max_docs:
            break
    return docs


def write_corpus(docs: list[str], output: str | Path) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return output


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_tools.sample_corpus", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["synthetic", "stdlib"])
    p.add_argument("--output", required=True)
    p.add_argument("--num-docs", type=int, default=2000, help="synthetic: documents; stdlib: at most this many (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    docs = synthetic_documents(args.num_docs, args.seed) if args.kind == "synthetic" else stdlib_documents(args.num_docs)
    path = write_corpus(docs, args.output)
    print(json.dumps({"output": str(path), "documents": len(docs), "bytes": path.stat().st_size}))


if __name__ == "__main__":
    main()
