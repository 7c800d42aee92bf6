"""MovieLens-100K as shipped inside the ``recbole`` 1.2.1 wheel: fetched, checksum-verified and parsed.

The wheel is fetched with ``pip download --no-deps`` into a cache folder and read as a zip file; recbole
is never installed (its dependencies conflict with the platform's). The wheel's sha256 is pinned here, so
a different file under the same name is refused. The three files used are
``recbole/dataset_example/ml-100k/ml-100k.{inter,user,item}``: tab-separated with a typed header
(``user_id:token  item_id:token  rating:float  timestamp:float`` ...).

Raw tables only; the mapping of ratings to daily impression and user-feature partitions of the data
contract is the movielens source's job.
"""

from __future__ import annotations

import hashlib
import io
import logging
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

__all__ = ["WHEEL_NAME", "WHEEL_SHA256", "MovieLens", "MovieLensError", "fetch_wheel", "read_movielens"]

WHEEL_REQUIREMENT = "recbole==1.2.1"
WHEEL_NAME = "recbole-1.2.1-py3-none-any.whl"
WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
DATA_DIR = "recbole/dataset_example/ml-100k"


class MovieLensError(RuntimeError):
    """The wheel could not be fetched, or is not the pinned file."""


@dataclass(frozen=True)
class MovieLens:
    """The raw tables.

    Attributes:
        ratings: ``user_id`` (int64), ``item_id`` (int64), ``rating`` (int8, 1-5), ``event_ts``
            (datetime64[us, UTC]); in the file's order.
        users: ``user_id``, ``age`` (int64), ``gender``, ``occupation``, ``zip_code`` (str).
        items: ``item_id``, ``title`` (str), ``release_year`` (float64, NaN when unknown), ``genres``
            (list of str).
    """

    ratings: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame


def fetch_wheel(cache_dir: Path, timeout_s: float = 300.0) -> Path:
    """The pinned recbole wheel in ``cache_dir``, downloaded (without its dependencies) when absent.

    Raises:
        MovieLensError: pip failed, or the file's sha256 is not :data:`WHEEL_SHA256` (a corrupt or
            substituted download is deleted, never read).
    """
    cache_dir = Path(cache_dir)
    wheel = cache_dir / WHEEL_NAME
    if not wheel.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        log.info("fetching %s into %s", WHEEL_REQUIREMENT, cache_dir)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(cache_dir), WHEEL_REQUIREMENT],
            capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0 or not wheel.exists():
            raise MovieLensError(f"pip download {WHEEL_REQUIREMENT} failed ({done.returncode}): {done.stderr[-1000:]}")
    with open(wheel, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise MovieLensError(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256}: deleted, fetch it again")
    return wheel


def _table(archive: zipfile.ZipFile, name: str) -> pd.DataFrame:
    """One typed-header TSV of the dataset; the header's ``name:type`` becomes ``name``."""
    raw = archive.read(f"{DATA_DIR}/ml-100k.{name}")
    frame = pd.read_csv(io.BytesIO(raw), sep="\t", encoding="latin-1", dtype=str, keep_default_na=False)
    frame.columns = [c.split(":", 1)[0] for c in frame.columns]
    return frame


def read_movielens(wheel: Path) -> MovieLens:
    """Parses the ratings, users and items of MovieLens-100K from the (verified) wheel."""
    with zipfile.ZipFile(wheel) as archive:
        inter, user, item = (_table(archive, n) for n in ("inter", "user", "item"))
    ratings = pd.DataFrame({
        "user_id": inter["user_id"].astype("int64"),
        "item_id": inter["item_id"].astype("int64"),
        "rating": inter["rating"].astype(float).astype("int8"),
        "event_ts": pd.to_datetime(inter["timestamp"].astype(float).astype("int64"), unit="s", utc=True)
                    .astype("datetime64[us, UTC]"),
    })
    users = pd.DataFrame({
        "user_id": user["user_id"].astype("int64"),
        "age": user["age"].astype("int64"),
        "gender": user["gender"],
        "occupation": user["occupation"],
        "zip_code": user["zip_code"],
    })
    items = pd.DataFrame({
        "item_id": item["item_id"].astype("int64"),
        "title": item["movie_title"],
        "release_year": pd.to_numeric(item["release_year"], errors="coerce"),
        "genres": item["class"].map(lambda s: s.split() if s else []),
    })
    return MovieLens(ratings=ratings, users=users, items=items)
