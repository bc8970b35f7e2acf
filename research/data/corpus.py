"""Named corpora and where to find them.

A corpus is resolved in this order: an explicit path, ``$RESEARCH_DATA/<name>``,
``../shared/data/<name>`` beside the checkout, then a download from its public URL into the cache,
checked against its sha256.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from research.config import REPO_ROOT, ResearchError


class DataError(ResearchError, ValueError):
    """A corpus, text file or tokenizer input that cannot be used, with the fix in the message."""


class CorpusNotFoundError(DataError, FileNotFoundError):
    """No corpus at the name or path given (or none of its files are text)."""


@dataclass(frozen=True)
class KnownCorpus:
    url: str
    sha256: str
    filename: str


KNOWN_CORPORA = {
    "tinyshakespeare": KnownCorpus(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        filename="input.txt",
    ),
}


def cache_root(configured: str = "") -> Path:
    root = configured or os.environ.get("RESEARCH_CACHE") or "~/.cache/research"
    return Path(root).expanduser()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _candidates(name: str) -> list[Path]:
    places = []
    if os.environ.get("RESEARCH_DATA"):
        places.append(Path(os.environ["RESEARCH_DATA"]) / name)
    places.append(REPO_ROOT.parent / "shared" / "data" / name)
    return places


def _download(name: str, known: KnownCorpus, cache: Path) -> Path:
    target = cache / "corpora" / name / known.filename
    if target.exists() and sha256_file(target) == known.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        with urllib.request.urlopen(known.url, timeout=60) as response:
            tmp.write(response.read())
    got = sha256_file(Path(tmp.name))
    if got != known.sha256:
        os.unlink(tmp.name)
        raise CorpusNotFoundError(
            f"Downloaded {known.url} but its sha256 is {got}, expected {known.sha256}; "
            "the file changed upstream or the download was corrupted."
        )
    os.replace(tmp.name, target)
    return target


def resolve_corpus(corpus: str, cache_dir: str = "") -> list[Path]:
    """The text files of a corpus (a name or a path), in a stable order."""
    explicit = Path(corpus).expanduser()
    looked = []
    if explicit.exists():
        found = explicit
    else:
        looked.append(str(explicit))
        found = None
        for place in _candidates(corpus):
            looked.append(str(place))
            if place.exists():
                found = place
                break
        if found is None and corpus in KNOWN_CORPORA:
            try:
                found = _download(corpus, KNOWN_CORPORA[corpus], cache_root(cache_dir))
            except OSError as error:
                looked.append(f"{KNOWN_CORPORA[corpus].url} ({error})")
    if found is None:
        looked = list(dict.fromkeys(looked))  # an absolute path is every candidate at once
        raise CorpusNotFoundError(
            f"Corpus '{corpus}' not found. Looked in: {'; '.join(looked)}. Fix: pass a path with "
            f"--set data.corpus=/path/to/text, set RESEARCH_DATA to a folder holding '{corpus}/', "
            f"or use a known corpus ({', '.join(KNOWN_CORPORA)})."
        )
    files = sorted(found.rglob("*.txt")) if found.is_dir() else [found]
    if not files:
        raise CorpusNotFoundError(
            f"Corpus folder {found} holds no .txt files; put the text in files ending in .txt "
            "there, or point --set data.corpus at a text file."
        )
    return files


def read_text(files: list[Path], separator: str) -> str:
    """The corpus' files as one UTF-8 string, joined by ``separator``.

    A file that is not UTF-8 is named with the offset of its first bad byte (so it can be
    found with ``head -c``), rather than a UnicodeDecodeError from deep in the pipeline."""
    texts = []
    for path in files:
        raw = path.read_bytes()
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            bad = raw[error.start : error.start + 4]
            raise DataError(
                f"{path} is not UTF-8 text: byte offset {error.start} (bytes {bad.hex(' ')}) "
                f"{error.reason}. Convert it (e.g. iconv -f latin1 -t utf-8) or move it out of "
                "the corpus."
            ) from None
    text = separator.join(texts)
    if not text.strip():
        names = ", ".join(str(p) for p in files[:3]) + (", ..." if len(files) > 3 else "")
        raise DataError(
            f"The corpus is empty: no text in {names}. Add text to it or point "
            "--set data.corpus at another corpus."
        )
    return text
