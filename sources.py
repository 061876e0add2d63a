"""
The raw side of the datasets of Table 1 (paper Sec 4.1): the publishers' files, downloaded and read
as shipped, and the embedded synthetic default with a known answer. data.py turns what this module
reads into a prepared folder; this module never imports data.py.

    python data.py                                  # generate_synthetic, then read_movielens
    python data.py --dataset=ml1m --download=True   # download / raw_file, then read_movielens

Datasets (raw files exactly as the publishers ship them, default folder data/raw/<name>/):
  synthetic          generated here in ml-20m's format (+ reviews.csv), read by the MovieLens reader
  ml20m-shape        generated here: ml-20m's size and shape, no content (generate_ml20m_shape)
  ml20m ml25m ml-latest-small    ratings.csv + movies.csv
  ml1m               ratings.dat + movies.dat (::, latin-1)
  ml100k             u.data (tab) + u.item (|, latin-1, 19 genre flags)
  amazon_movies(_5)  Movies_and_TV(_5).json(.gz) + meta_Movies_and_TV.json.gz (Amazon Review 2018)
  google_ny          review-New_York.json.gz + meta-New_York.json.gz (Google Local 2021)

What it holds, top to bottom:
- Report: bad input counted per reason per file, one summary line per file; --strict=True makes the
  earliest bad line in file order an error naming file and line.
- download / raw_file: where a raw file lives, fetched on request (atomic; zips unpacked without
  their folders).
- the readers: every one returns RawEvents, the events in file order with the item catalogue.
  read_numeric parses numeric rating files in chunks with numpy; MovieLens .csv/.dat/u.data/u.item;
  Amazon and Google JSON lines.
- the synthetic generator: a World of items (planted genre, popularity, successor), users whose
  taste drifts, written as ml-20m-format ratings.csv / movies.csv + reviews.csv; the oracle (the
  true next-item distribution) and the best achievable Recall@K, read back from the oracle_*.npy
  files of the prepared folder.

Documented decisions about raw input
- One genre per item: a MovieLens item with several genres gets its least frequent genre across the
  catalogue (the most specific one), ties to the first listed; "(no genres listed)" is a genre of
  its own. Amazon: the last element of the category list that is not the root "Movies & TV" (the
  root itself when nothing else is listed). Google: the first category (the place's primary
  category, the one Google Maps shows). Null/empty -> "(no category)".
- Review text for generation: Amazon summary, the short opinion the paper generates ("Four Stars.",
  Sec 4.1 and App. E; reviewText only when the summary is missing or empty), Google text (null ->
  '').
- Bad input: blank lines of JSON-lines files are skipped, not counted. A truncated or corrupt
  .gz/.zip is always an error (re-download), never a partial read.

Dimension letters: E events of a raw file, U users, T steps of the generator, G genres, I items of
the generator's catalogue, B rows, V prepared item ids (padding included).
"""
import csv
import gzip
import html
import json
import math
import os
import re
import shutil
import urllib.request
import warnings
import zipfile
import zlib
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from config import UserError

ML = "https://files.grouplens.org/datasets/movielens/"
UCSD = "https://datarepo.eng.ucsd.edu/mcauley_group/"
AMAZON_URL = UCSD + "data/amazon_v2/"
# name -> reader kind and {raw file: URL}. The URLs are the public files as listed on the dataset
# pages; verify. For MovieLens the URL is the zip holding the file (download unzips it).
DATASETS = {
    "ml20m": ("movielens", {f: ML + "ml-20m.zip" for f in ("ratings.csv", "movies.csv")}),
    "ml25m": ("movielens", {f: ML + "ml-25m.zip" for f in ("ratings.csv", "movies.csv")}),
    "ml-latest-small": ("movielens",
                        {f: ML + "ml-latest-small.zip" for f in ("ratings.csv", "movies.csv")}),
    "ml1m": ("movielens", {f: ML + "ml-1m.zip" for f in ("ratings.dat", "movies.dat")}),
    "ml100k": ("movielens", {f: ML + "ml-100k.zip" for f in ("u.data", "u.item")}),
    "amazon_movies": ("amazon", {
        "Movies_and_TV.json.gz": AMAZON_URL + "categoryFiles/Movies_and_TV.json.gz",
        "meta_Movies_and_TV.json.gz": AMAZON_URL + "metaFiles2/meta_Movies_and_TV.json.gz"}),
    "amazon_movies_5": ("amazon", {
        "Movies_and_TV_5.json.gz": AMAZON_URL + "categoryFilesSmall/Movies_and_TV_5.json.gz",
        "meta_Movies_and_TV.json.gz": AMAZON_URL + "metaFiles2/meta_Movies_and_TV.json.gz"}),
    "google_ny": ("google", {
        "review-New_York.json.gz": UCSD + "gdrive/googlelocal/review-New_York.json.gz",
        "meta-New_York.json.gz": UCSD + "gdrive/googlelocal/meta-New_York.json.gz"}),
}
ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]
NO_GENRE, NO_CATEGORY = "(no genres listed)", "(no category)"


# --------------------------------------------------------------------------------------------------
# bad input: counted per reason per file, or in strict mode the earliest bad line is an error

class Report:
    """Bad-input bookkeeping of one raw file: rows kept, rows dropped per reason, rows repaired per
    reason. strict=True turns the earliest problem in file order into a one-line UserError naming
    file and line, raised by close() once every check of the file has run (readers close after
    reading, data.order_events after its vectorised checks). Raising at the first problem seen would
    be wrong: a duplicate found after reading can sit on an earlier line than a malformed line found
    while reading."""

    def __init__(self, path, strict=False):
        self.path, self.strict = Path(path), strict
        self.first = None  # (line, reason) of the earliest problem
        self.kept, self.dropped, self.repaired = 0, Counter(), Counter()

    def drop(self, reason, line, n=1):
        self._note(reason, line)
        self.dropped[reason] += n

    def repair(self, reason, line):
        self._note(reason, line)
        self.repaired[reason] += 1

    def _note(self, reason, line):
        if self.strict and (self.first is None or line < self.first[0]):
            self.first = (int(line), reason)

    def close(self, kept):
        """Record the rows kept; in strict mode, fail on the earliest problem any check found."""
        self.kept = kept
        if self.first:
            raise UserError(f"{self.path}:{self.first[0]}: {self.first[1]} (strict mode)")

    def summary(self):
        parts = lambda c: ", ".join(f"{k}: {v:,}" for k, v in sorted(c.items()))
        s = f"{self.path.name}: kept {self.kept:,}, dropped {sum(self.dropped.values()):,}"
        s += f" ({parts(self.dropped)})" if self.dropped else ""
        return s + (f"; repaired {parts(self.repaired)}" if self.repaired else "")


# --------------------------------------------------------------------------------------------------
# raw files: location, download

def download(url, dest, timeout=10):
    """Fetch url to dest with a progress bar; atomic (.part then rename). Offline: one-line
    UserError."""
    from tqdm import tqdm
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                      disable=total is None) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (OSError, ValueError) as e:  # URLError, timeouts and refused connections are all OSError
        part.unlink(missing_ok=True)
        raise UserError(f"could not download {dest.name} from {url} ({e}); download it by hand and "
                        f"put it at {dest}")
    os.replace(part, dest)
    return dest


def raw_file(raw_dir, name, url, fetch=False):
    """Path of a raw file; a gzipped file may also be present un-gzipped. Missing: download it or
    exit naming both."""
    p = Path(raw_dir) / name
    for cand in (p, p.with_suffix("") if p.suffix == ".gz" else p):
        if cand.exists():
            return cand
    if not fetch:
        how = f"unzip {url} into {p.parent}" if url.endswith(".zip") else f"download {url} to {p}"
        raise UserError(f"missing raw file {p}: {how} (or rerun with --download=True)")
    if not url.endswith(".zip"):
        return download(url, p)
    z = download(url, Path(raw_dir) / url.rsplit("/", 1)[1])
    try:
        _unzip_flat(z, raw_dir)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a download cut short, damaged bytes
        raise UserError(f"{z}: the zip file is truncated or corrupt ({e}); rerun with "
                        "--download=True to fetch "
                         "it again")
    if not p.exists():
        raise UserError(f"{z} does not contain {name}")
    return p


def _unzip_flat(z, raw_dir):
    """Extract the files of zip z into raw_dir without their folders (MovieLens zips hold one:
    ml-20m/...). Each goes to .part first, so a member that can't be read whole leaves no half file
    that a later run would take as raw."""
    with zipfile.ZipFile(z) as zf:
        for m in zf.infolist():
            if not m.is_dir():
                dst = Path(raw_dir) / Path(m.filename).name
                part = dst.with_name(dst.name + ".part")
                try:
                    with zf.open(m) as src, open(part, "wb") as f:
                        shutil.copyfileobj(src, f)
                    os.replace(part, dst)
                finally:
                    part.unlink(missing_ok=True)  # still there only when the copy failed


# --------------------------------------------------------------------------------------------------
# raw readers: every reader returns RawEvents (events in file order + the item catalogue)

@dataclass
class RawEvents:
    user: np.ndarray            # (E,) int64 user key: the raw numeric id, or a code into user_names
    item: np.ndarray            # (E,) int64 index into the catalogue, -1 = unknown item
    ts: np.ndarray              # (E,) int64 seconds
    rating: np.ndarray          # (E,) float32
    line: np.ndarray            # (E,) int64 line of the event in the events file (strict errors)
    item_ids: list              # catalogue: raw item id,
    item_titles: list           # its title,
    item_genre: list            # and its ONE genre/category name
    report: Report              # bad input of the events file
    other_reports: list         # bad input of the other files read
    user_names: list = None     # raw user id per code, when raw user ids are strings
    review_bytes: np.ndarray = None    # uint8 utf-8 texts, row order of the arrays above
    review_offsets: np.ndarray = None  # (E+1,) int64


def read_numeric(path, sep, dtypes, int_cols, report, header, checks=None, chunk_bytes=1 << 26):
    """Fast reader for numeric delimited files (ratings): chunks are parsed by numpy in C; a chunk
    whose lines don't all have the right number of fields, or that numpy can't parse, is re-parsed
    line by line, counting bad lines. checks(x) -> {reason: (rows,) bool}: the parsed values a
    row may not hold (dropped and counted before any cast). Returns one array per column (typed as
    dtypes) and the file line number of each row."""
    cols, lines, line_no, rest = [[] for _ in dtypes], [], 1, b""
    with open(path, "rb") as f:
        if header:
            f.readline()
            line_no = 2
        while True:
            block = f.read(chunk_bytes)
            data = rest + block
            cut = data.rfind(b"\n") if block else len(data)
            if cut < 0:
                rest = data
                continue
            chunk, rest = data[:cut], data[cut + 1:]
            if chunk:
                x, ln = _parse_chunk(chunk, sep, len(dtypes), int_cols, report, line_no)
                if checks is not None and len(x):
                    keep = np.ones(len(x), bool)
                    for reason, bad in checks(x).items():
                        _drop_rows(report, reason, ln[bad & keep])
                        keep &= ~bad
                    x, ln = x[keep], ln[keep]
                for j, (c, dt) in enumerate(zip(cols, dtypes)):
                    c.append(x[:, j].astype(dt))
                lines.append(ln)
            line_no += chunk.count(b"\n") + 1
            if not block:
                break
    out = []
    for c, dt in zip(cols + [lines], list(dtypes) + [np.int64]):
        out.append(np.concatenate(c) if c else np.zeros(0, dt))
        c.clear()  # one column's chunks at a time: the peak holds one column twice, not all
    return out[:-1], out[-1]


def _drop_rows(report, reason, lines):
    if len(lines):
        report.drop(reason, int(lines.min()), len(lines))


def _parse_chunk(chunk, sep, n_fields, int_cols, report, first_line):
    """(rows, n_fields) float64 and line numbers of a chunk of whole lines (no trailing newline)."""
    n_lines = chunk.count(b"\n") + 1
    fast = chunk if sep == b"," else chunk.replace(sep, b",")
    if b"\r" in fast:
        fast = fast.replace(b"\r", b"")
    a = np.frombuffer(fast, np.uint8)
    commas = np.searchsorted(np.flatnonzero(a == 44), np.r_[-1, np.flatnonzero(a == 10), len(a)])
    if (np.diff(commas) == n_fields - 1).all():  # every line has the right number of fields
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy warns (and stops) on text it cannot parse
            try:
                x = np.fromstring(fast.replace(b"\n", b","), dtype=np.float64, sep=",")
            except (ValueError, DeprecationWarning):
                x = np.zeros(0)
        if x.size == n_lines * n_fields:
            x = x.reshape(n_lines, n_fields)  # (rows, fields)
            if np.isfinite(x).all() and (x[:, int_cols] == np.floor(x[:, int_cols])).all():
                return x, first_line + np.arange(n_lines)
    return _parse_lines(chunk, sep, n_fields, int_cols, report, first_line)


def _parse_lines(chunk, sep, n_fields, int_cols, report, first_line):
    """The slow path: one line at a time, every bad line counted (or, strict, the first one an
    error)."""
    rows, lines = [], []
    for k, raw in enumerate(chunk.split(b"\n")):
        ln, raw = first_line + k, raw.rstrip(b"\r")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            report.drop("invalid utf-8", ln)
            continue
        parts = raw.split(sep)
        if len(parts) != n_fields:
            report.drop("malformed line", ln)
            continue
        if not all(p.strip() for p in parts):
            report.drop("missing field", ln)
            continue
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            report.drop("malformed line", ln)
            continue
        if not all(map(math.isfinite, vals)) or any(vals[c] != int(vals[c]) for c in int_cols):
            report.drop("malformed line", ln)
            continue
        rows.append(vals)
        lines.append(ln)
    return np.array(rows, np.float64).reshape(-1, n_fields), np.array(lines, np.int64)


def _text_lines(path, report, encoding):
    """Yield (line number, str) of a text file; utf-8 lines that aren't valid utf-8 are repaired and
    counted."""
    with open(path, "rb") as f:
        for ln, b in enumerate(f, 1):
            try:
                s = b.decode(encoding)
            except UnicodeDecodeError:
                report.repair("invalid utf-8", ln)
                s = b.decode(encoding, "replace")
            yield ln, s.rstrip("\r\n")


def read_movielens_items(path, report):
    """MovieLens catalogue: movies.csv (quoted titles, '|' genres), movies.dat (::, latin-1) or
    u.item (|, latin-1, 19 genre flags). Returns raw ids, titles and genre lists, in file order."""
    name = Path(path).name
    lines = _text_lines(path, report, "utf-8" if name.endswith(".csv") else "latin-1")
    if name.endswith(".csv"):
        next(lines, None)  # header movieId,title,genres
        reader = csv.reader(s for _, s in lines)  # handles "Title, The (1995)" quoting
        rows = ((reader.line_num + 1, row) for row in reader)
    else:
        rows = ((ln, s.split("::" if name.endswith(".dat") else "|")) for ln, s in lines)
    ids, titles, genres, seen = [], [], [], set()
    n_fields = 24 if name == "u.item" else 3
    for ln, row in rows:
        if not any(row):
            report.drop("malformed line", ln)
            continue
        # isdigit() passes '²', which int() refuses
        if len(row) != n_fields or not row[0].strip().isdecimal():
            report.drop("malformed line", ln)
            continue
        if not row[1].strip():
            report.drop("missing field", ln)
            continue
        if int(row[0]) in seen:
            report.drop("duplicate", ln)
            continue
        if n_fields == 24:
            g = [ML100K_GENRES[k] for k, flag in enumerate(row[5:]) if flag.strip() == "1"]
        else:
            g = [x for x in row[2].split("|") if x.strip()]
        seen.add(int(row[0]))
        ids.append(int(row[0]))
        titles.append(row[1].strip())
        genres.append(g or [NO_GENRE])
    report.close(len(ids))
    return ids, titles, genres


def most_specific_genre(genres):
    """One genre per item: its least frequent genre across the catalogue (the most specific), ties
    to the first listed. genres: list of genre-name lists -> list of names."""
    freq = Counter(g for gs in genres for g in set(gs))
    return [min(gs, key=lambda g: freq[g]) for gs in genres]  # min keeps the first of equal keys


def movielens_checks(x):
    """The values a MovieLens rating row (user, movie, rating, time) cannot hold: ids and times
    outside [0, 2^62) (an int64 column could not even hold 1e30), a rating outside the half stars
    0.5 .. 5."""
    ids, rating, t = x[:, :2], x[:, 2], x[:, 3]
    return {"id out of range": ((ids < 0) | (ids >= 2.0 ** 62)).any(1),
            "time out of range": (t < 0) | (t >= 2.0 ** 62),
            "rating out of range": (rating < 0.5) | (rating > 5) | (rating * 2 % 1 != 0)}


def read_movielens(raw_dir, name, strict=False, fetch=False):
    """MovieLens in any of its shipped formats (+ the synthetic reviews.csv when present) ->
    RawEvents."""
    files = DATASETS.get(name, DATASETS["ml20m"])[1]  # the synthetic default is in ml-20m format
    (ev_name, url), (it_name, it_url) = files.items()
    ev_path = raw_file(raw_dir, ev_name, url, fetch)
    it_path = raw_file(raw_dir, it_name, it_url, fetch)
    it_report, report = Report(it_path, strict), Report(ev_path, strict)
    ids, titles, genres = read_movielens_items(it_path, it_report)
    sep = {".csv": b",", ".dat": b"::"}.get(ev_path.suffix, b"\t")
    dtypes = (np.int64, np.int64, np.float32, np.int64)
    (user, raw_item, rating, ts), line = read_numeric(ev_path, sep, dtypes, [0, 1, 3], report,
                                                      header=ev_path.suffix == ".csv",
                                                      checks=movielens_checks)
    lut = np.full(max(ids, default=0) + 2, -1, np.int64)  # raw id -> catalogue index; last: unknown
    lut[np.array(ids, np.int64)] = np.arange(len(ids))
    item = lut[np.where((raw_item >= 0) & (raw_item < len(lut)), raw_item, len(lut) - 1)]
    raw = RawEvents(user, item, ts, rating, line, ids, titles, most_specific_genre(genres), report,
                    [it_report])
    rev_path = Path(raw_dir) / "reviews.csv"
    if rev_path.exists():
        _attach_reviews(raw, raw_item, rev_path, strict)
    return raw


def _attach_reviews(raw, raw_item, path, strict):
    """reviews.csv (userId,movieId,timestamp,text; written by the synthetic generator): texts joined
    to ratings on (user, item, timestamp)."""
    report, texts = Report(path, strict), {}
    lines = _text_lines(path, report, "utf-8")
    next(lines, None)
    reader = csv.reader(s for _, s in lines)
    for row in reader:
        try:
            key = (int(row[0]), int(row[1]), int(row[2]))
        except (ValueError, IndexError):
            report.drop("malformed line", reader.line_num + 1)
            continue
        texts.setdefault(key, (reader.line_num + 1, row[3] if len(row) > 3 else ""))  # (line, text)
    keys = zip(raw.user.tolist(), raw_item.tolist(), raw.ts.tolist())
    enc = [texts.pop(k, (0, ""))[1].encode() for k in keys]
    if texts:  # texts of no rating: counted at the first one's line, the line strict mode names
        report.drop("unknown id", min(ln for ln, _ in texts.values()), len(texts))
    report.close(sum(map(bool, enc)))
    raw.review_offsets = np.r_[0, np.cumsum([len(b) for b in enc])].astype(np.int64)
    raw.review_bytes = np.frombuffer(b"".join(enc), np.uint8)
    raw.other_reports.append(report)


def json_lines(path, report):
    """Yield (line number, dict) of a JSON-lines file, gzipped or not (told by its magic bytes, not
    its name). Blank lines are skipped uncounted (an editor's trailing newline is not bad data)."""
    for ln, b in _raw_lines(path):
        try:
            s = b.decode("utf-8")
        except UnicodeDecodeError:
            report.repair("invalid utf-8", ln)
            s = b.decode("utf-8", "replace")
        if not s.strip():
            continue
        try:
            obj = json.loads(s)
        except (ValueError, RecursionError):  # RecursionError: absurdly nested brackets
            obj = None
        if not isinstance(obj, dict):
            report.drop("malformed line", ln)
            continue
        yield ln, obj


def _raw_lines(path):
    """Yield (line number, bytes) of a file, gunzipped when it starts with the gzip magic bytes. A
    truncated or corrupt gzip file is a one-line UserError naming the last whole line read: its tail
    is lost, so the user must fetch it again (a partial read would silently prepare a different
    dataset)."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    ln = 0
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            for ln, b in enumerate(f, 1):
                yield ln, b
    except EOFError:
        raise UserError(f"{path}: the gzip file ends early (truncated?) after line {ln:,}; "
                        "re-download it") from None
    except (zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f"{path}: the gzip file is corrupt after line {ln:,} ({e}); re-download "
                        "it") from None


def clean_title(title, fallback):
    """Publisher titles may be HTML, empty or null: strip tags, unescape entities, fall back, cap
    the length."""
    if not isinstance(title, str):
        return fallback
    title = " ".join(html.unescape(re.sub(r"<[^>]*>", " ", title)).split())
    return title[:200] if title else fallback


# field names of the two JSON sources; `pick` chooses one category from the list (see the
# docstring); `text`: the review-generation target, the first non-blank field listed (Amazon: the
# summary the paper generates, Sec 4.1)
AMAZON = dict(user="reviewerID", item="asin", rating="overall", time="unixReviewTime", ms=False,
              text=("summary", "reviewText"), title="title", fallback="Item {}",
              pick=lambda c: c[-1] if len(c) > 1 else c[0])
GOOGLE = dict(user="user_id", item="gmap_id", rating="rating", time="time", ms=True,
              text=("text",), title="name", fallback="Place {}", pick=lambda c: c[0])


def read_json_source(review_path, meta_path, src, strict=False):
    """Amazon Review 2018 / Google Local 2021: review JSON lines + item metadata JSON lines ->
    RawEvents. Items reviewed but absent from the metadata keep a fallback title ('Item <asin>') and
    '(no category)'."""
    meta_report, report = Report(meta_path, strict), Report(review_path, strict)
    index, titles, cats = {}, [], []
    for ln, m in json_lines(meta_path, meta_report):
        key = m.get(src["item"])
        if not isinstance(key, str) or not key:
            meta_report.drop("missing field", ln)
            continue
        if key in index:
            meta_report.drop("duplicate", ln)
            continue
        c = m.get("category")
        c = [html.unescape(x).strip() for x in (c if isinstance(c, list) else [c])
             if isinstance(x, str) and x.strip()]
        index[key] = len(titles)
        titles.append(clean_title(m.get(src["title"]), src["fallback"].format(key)))
        cats.append(src["pick"](c) if c else NO_CATEGORY)
    meta_report.close(len(titles))
    users, user, item, ts = {}, array("q"), array("q"), array("q")
    rating, line = array("f"), array("q")
    texts, offsets = bytearray(), array("q", [0])
    for ln, r in json_lines(review_path, report):
        ev = _review_event(r, src)
        if isinstance(ev, str):
            report.drop(ev, ln)
            continue
        u, i, y, t = ev
        if i not in index:
            index[i] = len(titles)
            titles.append(src["fallback"].format(i))
            cats.append(NO_CATEGORY)
            # expected, so not a strict-mode error
            report.repaired["item without metadata (fallback title)"] += 1
        user.append(users.setdefault(u, len(users)))
        item.append(index[i]), ts.append(t), rating.append(y), line.append(ln)
        text = next((r[k] for k in src["text"] if isinstance(r.get(k), str) and r[k].strip()), "")
        texts += text.encode("utf-8", "replace")
        offsets.append(len(texts))
    arr = lambda a, dt: np.frombuffer(a, dt).copy() if len(a) else np.zeros(0, dt)
    return RawEvents(arr(user, np.int64), arr(item, np.int64), arr(ts, np.int64),
                     arr(rating, np.float32), arr(line, np.int64), list(index), titles, cats,
                     report, [meta_report], user_names=list(users),
                     review_bytes=arr(texts, np.uint8), review_offsets=arr(offsets, np.int64))


def _review_event(r, src):
    """(user, item, rating, seconds) of a review row, or the reason it is dropped."""
    u, i, y, t = (r.get(src[k]) for k in ("user", "item", "rating", "time"))
    if any(v is None or v == "" for v in (u, i, y, t)):
        return "missing field"
    try:
        y, t = float(y), int(t) // (1000 if src["ms"] else 1)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int() of an infinite time
        return "malformed line"
    if not math.isfinite(y) or not -2 ** 63 <= t < 2 ** 63:  # a NaN rating, or no int64 time
        return "malformed line"
    if not 1 <= y <= 5:  # Amazon's and Google's stars
        return "rating out of range"
    if not 0 <= t < 2 ** 62:
        return "time out of range"
    return str(u), str(i), y, t


# --------------------------------------------------------------------------------------------------
# the embedded default: a synthetic dataset with a known answer (its oracle below)

GENRES = ["Action", "Adventure", "Animation", "Children", "Crime", "Documentary", "Fantasy",
          "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
          "Western", "IMAX"]
# extra genres carried by many items: never the least frequent, so never the feature
BROAD = ("Drama", "Comedy")


@dataclass
class World:
    """The generator's ground truth about items: the next item is the previous item's successor with
    probability p_seq, otherwise genre ~ the user's preference and item ~ popularity within that
    genre."""
    item_genre: np.ndarray  # (I,) planted genre index
    pop: np.ndarray         # (I,) popularity within the genre (sums to 1 per genre)
    successor: np.ndarray   # (I,) the item that tends to follow
    p_seq: float


def make_world(n_items, n_genres, p_seq, rng):
    item_genre = rng.permutation(np.arange(n_items) % n_genres)
    rank = np.empty(n_items)
    for g in range(n_genres):  # a Zipf(0.8) popularity within each genre, over a random item order
        m = np.flatnonzero(item_genre == g)
        rank[m] = rng.permutation(len(m)) + 1
    pop = rank ** -0.8
    pop /= np.bincount(item_genre, pop)[item_genre]
    successor = (np.arange(n_items) + rng.integers(1, n_items, n_items)) % n_items  # never itself
    return World(item_genre, pop, successor, p_seq)


def next_item_probs(world, pref, prev):
    """The oracle: (B, G) genre preferences and (B,) previous items (-1 = none) -> (B, I) true
    next-item probs."""
    p = pref[:, world.item_genre] * world.pop  # (B, I)
    has = np.flatnonzero(prev >= 0)
    p[has] *= 1 - world.p_seq
    p[has, world.successor[prev[has]]] += world.p_seq
    return p


def sample_next(world, pref, prev, rng):
    """Draw one next item per row from next_item_probs, without forming the (B, I) matrix."""
    B = len(pref)
    genre = (rng.random(B)[:, None] < np.cumsum(pref, 1)).argmax(1)  # (B,) genre ~ pref
    order = np.argsort(world.item_genre, kind="stable")  # items grouped by genre
    cdf = world.item_genre[order] + _cumsum_within(world.pop[order], world.item_genre[order])
    lo = np.searchsorted(world.item_genre[order], genre, "left")
    hi = np.searchsorted(world.item_genre[order], genre, "right") - 1
    pick = np.clip(np.searchsorted(cdf, genre + rng.random(B), "right"), lo, hi)  # ~ pop in genre
    seq = (prev >= 0) & (rng.random(B) < world.p_seq)
    return np.where(seq, world.successor[np.maximum(prev, 0)], order[pick])


def _cumsum_within(x, group):
    """Cumulative sum of x restarting at every new value of the sorted array group."""
    c = np.cumsum(x)
    first = np.r_[0, np.flatnonzero(group[1:] != group[:-1]) + 1]
    return c - np.repeat(np.r_[0, c[first[1:] - 1]], np.diff(np.r_[first, len(x)]))


def _preference(favs, weights, n_genres, eps=0.1):
    """(U, F) favourite genres and their weights -> (U, G) preference: 1-eps on the favourites, eps
    spread evenly."""
    pref = np.full((len(favs), n_genres), eps / n_genres)
    np.add.at(pref, (np.arange(len(favs))[:, None], favs), (1 - eps) * weights)
    return pref


def generate_synthetic(raw_dir, n_users, n_items, n_genres, min_len, max_len, p_seq, p_drift, seed):
    """Write MovieLens-format ratings.csv / movies.csv / reviews.csv with planted structure; return
    the oracle: the World and (U, 2, G) preferences in force at each user's validation and test
    targets."""
    if n_genres < 3 or n_items < n_genres:
        raise UserError(f"synthetic data needs n_genres >= 3 and n_items >= n_genres (got "
                        f"{n_genres}, {n_items})")
    rng = np.random.default_rng(seed)
    world = make_world(n_items, n_genres, p_seq, rng)
    U, T = n_users, max_len
    lengths = rng.integers(min_len, max_len + 1, U)
    favs = np.argsort(rng.random((U, n_genres)), 1)[:, :3]  # (U, 3) distinct favourite genres
    # 2 or 3 favourites
    weights = rng.dirichlet(np.ones(3), U) * (np.arange(3) < rng.integers(2, 4, U)[:, None])
    weights /= weights.sum(1, keepdims=True)
    items, ratings = np.zeros((U, T), np.int64), np.zeros((U, T))
    oracle_pref, prev = np.zeros((U, 2, n_genres)), -np.ones(U, np.int64)
    quality = rng.normal(0, 0.5, n_items)
    for t in range(T):
        swap = (rng.random(U) < p_drift) & (t > 0)  # drift: a favourite replaced by a new genre
        new, slot = rng.integers(0, n_genres, U), rng.integers(0, 3, U)
        swap &= ~(favs == new[:, None]).any(1)
        favs[swap, slot[swap]] = new[swap]
        pref = _preference(favs, weights, n_genres)
        items[:, t] = prev = sample_next(world, pref, prev, rng)
        affinity = pref[np.arange(U), world.item_genre[prev]] / pref.max(1)  # 1 = a top genre
        r = 1.5 + 2.5 * affinity + quality[prev] + rng.normal(0, 0.5, U)
        ratings[:, t] = np.clip(np.rint(r * 2) / 2, 0.5, 5.0)
        for s, at in enumerate((lengths - 2, lengths - 1)):  # validation and test targets
            oracle_pref[at == t, s] = pref[at == t]
    start = rng.integers(946684800, 1262304000, U)[:, None]
    ts = start + np.cumsum(rng.integers(60, 3 * 86400, (U, T)), 1)
    valid = np.arange(T) < lengths[:, None]
    user = np.broadcast_to(np.arange(1, U + 1)[:, None], (U, T))[valid]
    item, rating, ts = items[valid] + 1, ratings[valid], ts[valid]
    order = np.lexsort((item, user))  # ml-20m's own order: by user, then movie id (not by time)
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    write_ratings_csv(raw_dir / "ratings.csv", user[order], item[order], rating[order], ts[order])
    names = (GENRES + [f"Genre {k}" for k in range(len(GENRES), n_genres)])[:n_genres]
    titles = _write_movies_csv(raw_dir / "movies.csv", world, names, rng)
    genre_of = [names[g] for g in world.item_genre]
    _write_reviews_csv(raw_dir / "reviews.csv", user, item, rating, ts, titles, genre_of, rng)
    return world, oracle_pref, names


ML20M_RATINGS = (0.012, 0.034, 0.016, 0.072, 0.044, 0.214, 0.106, 0.276, 0.076, 0.150)  # 0.5 .. 5


def generate_ml20m_shape(raw_dir, n_users=138_493, n_items=26_744, n_events=20_000_263, seed=0):
    """MovieLens-20M's shape, without its content, in its publisher format (ratings.csv sorted by
    user then movie, movies.csv): long-tailed user lengths (at least 20 ratings, lognormal above:
    median about 68, mean about n_events / n_users), Zipf popularity, ML-20M's distribution of half
    stars, increasing times, titles of one to six words and a year. For rehearsing the paper-scale
    commands offline (docs/benchmarks.md); there is no planted structure and no oracle."""
    rng = np.random.default_rng(seed)
    extra = rng.lognormal(3.9, 1.25, n_users)  # above the 20 ratings every ML-20M user has
    lengths = 20 + np.floor(extra / extra.sum() * (n_events - 20 * n_users)).astype(np.int64)
    lengths[rng.choice(n_users, n_events - lengths.sum(), replace=False)] += 1
    user = np.repeat(np.arange(1, n_users + 1), lengths)
    cdf = np.cumsum(1.0 / np.arange(1, n_items + 1) ** 0.9)  # Zipf-like popularity
    item = np.searchsorted(cdf, rng.random(n_events) * cdf[-1]) + 1
    ids = rng.permutation(n_items) + 1  # the most popular are not the first ids
    item = ids[item - 1]
    rating = rng.choice(np.arange(1, 11) / 2, n_events, p=ML20M_RATINGS)
    start = np.repeat(rng.integers(789652009, 1400000000, n_users), lengths)
    step = 1 + rng.exponential(86400.0, n_events).astype(np.int64)  # distinct times: no duplicates
    first = np.cumsum(lengths) - lengths  # each user's first event
    ts = start + np.cumsum(step) - np.repeat(np.cumsum(step)[first] - step[first], lengths)
    order = np.lexsort((item, user))
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    write_ratings_csv(raw_dir / "ratings.csv", user, item[order], rating[order], ts[order])
    starts = ("Bl", "C", "D", "Fr", "G", "H", "K", "L", "M", "N", "P", "R", "S", "St", "T", "W")
    words = [a + b for a in starts for b in ("ade", "arn", "ell", "ine", "or", "un", "ight", "ast")]
    with open(raw_dir / "movies.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("movieId", "title", "genres"))
        for i in range(1, n_items + 1):
            title = " ".join(rng.choice(words, min(6, 1 + rng.geometric(0.45))))
            title += (", The" if rng.random() < 0.08 else "") + f" ({rng.integers(1915, 2015)})"
            w.writerow((i, title, "|".join(rng.choice(GENRES, rng.integers(1, 4), replace=False))))


GENRE_WORDS = ["Fist", "Quest", "Cartoon", "Puppy", "Heist", "Truth", "Wizard", "Shadow", "Scream",
               "Melody", "Secret", "Kiss", "Robot", "Fear", "Battle", "Frontier", "Saga", "Nebula",
               "Tears", "Laugh"]


def _write_movies_csv(path, world, names, rng):
    """Titles like MovieLens ('Quiet Storm, The (1994)' needs quoting); the planted genre plus broad
    extra genres. A title's first word names its planted genre (as real titles hint at theirs), so a
    language model that knows the user's taste can begin the right titles; the second word is random
    and the number makes each title unique."""
    words = ["Quiet", "Storm", "Last", "River", "Night", "Heart", "Iron", "Summer", "Ghost", "City",
             "Dream", "Road"]
    rows, titles = [], []
    for i, g in enumerate(world.item_genre):
        w = rng.choice(words, 2, replace=False)
        first = GENRE_WORDS[g % len(GENRE_WORDS)]
        title = f"{first} {w[0]} {i + 1}{', The' if i % 5 == 0 else ''} ({1950 + i % 70})"
        extra = [] if i % 10 == 9 else [BROAD[i % 2]]  # ~40% of items each: more than any planted
        gs = extra + [names[g]] if i % 2 else [names[g]] + extra  # the planted one not always first
        rows.append((i + 1, title, "|".join(gs)))
        titles.append(title)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("movieId", "title", "genres"))
        w.writerows(rows)
    got = most_specific_genre([r[2].split("|") for r in rows])
    assert got == [names[g] for g in world.item_genre], "broad genres must outnumber planted ones"
    return titles


def _write_reviews_csv(path, user, item, rating, ts, titles, genre_of, rng):
    """Templated review texts that depend on rating and genre, so review generation can be demoed
    offline."""
    good = ["Loved it. {t} is a great {g} film, I would watch it again.",
            "A wonderful {g} story; {t} never drags."]
    mid = ["{t} was fine: a decent {g} film with a few slow parts.",
           "An average {g} movie. {t} is watchable."]
    bad = ["Not for me. {t} felt like a weak {g} film.",
           "{t} is a dull {g} movie; I stopped caring early."]
    pick = rng.integers(0, 2, len(user))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("userId", "movieId", "timestamp", "text"))
        rows = zip(user.tolist(), item.tolist(), rating.tolist(), ts.tolist(), pick.tolist())
        for u, i, r, t, k in rows:
            tmpl = (good if r >= 4 else mid if r >= 3 else bad)[k]
            w.writerow((u, i, t, tmpl.format(t=titles[i - 1], g=genre_of[i - 1].lower())))


def write_ratings_csv(path, user, item, rating, ts, chunk=1 << 20):
    """ml-20m ratings.csv ('userId,movieId,rating,timestamp', one-decimal ratings) written with
    numpy, so the 20M-row benchmark file takes seconds: each row is laid out in a byte matrix whose
    padding is masked away."""
    stars = np.array([list(f"{k / 2:.1f}".encode()) for k in range(11)], np.uint8)  # (11, 3)
    with open(path, "wb") as f:
        f.write(b"userId,movieId,rating,timestamp\n")
        for s in range(0, len(user), chunk):
            n = len(user[s:s + chunk])
            const = lambda c: (np.full((n, 1), c, np.uint8), np.ones((n, 1), bool))
            half_stars = np.rint(np.asarray(rating[s:s + chunk]) * 2).astype(int)
            star = (stars[half_stars], np.ones((n, 3), bool))
            parts = [_ascii_digits(user[s:s + chunk]), const(44), _ascii_digits(item[s:s + chunk]),
                     const(44), star, const(44), _ascii_digits(ts[s:s + chunk]), const(10)]
            mat, mask = (np.concatenate(p, 1) for p in zip(*parts))  # (n, width) bytes, real ones
            f.write(mat[mask].tobytes())  # row-major boolean indexing keeps the byte order


def _ascii_digits(x):
    """(n,) non-negative ints -> (n, W) right-aligned ascii digits and (n, W) mask of the real
    (non-leading) ones."""
    x = np.asarray(x, np.int64)
    W = len(str(int(x.max(initial=0))))
    pw = 10 ** np.arange(W - 1, -1, -1, dtype=np.int64)  # (W,)
    nd = 1 + (x[:, None] >= pw[None, :-1]).sum(1)  # digits per number
    return ((x[:, None] // pw) % 10 + 48).astype(np.uint8), np.arange(W) >= (W - nd)[:, None]


# --------------------------------------------------------------------------------------------------
# the oracle of the synthetic default: saved with the prepared folder, read back in its ids

ORACLE_FILES = ("item_genre", "pop", "successor", "pref")  # oracle_<name>.npy, prepared folder


def write_oracle(out_dir, world, pref):
    """Save the generator's World and (U, 2, G) preferences (generate_synthetic's oracle) into a
    prepared folder."""
    arrays = dict(item_genre=world.item_genre, pop=world.pop, successor=world.successor, pref=pref)
    for k in ORACLE_FILES:
        np.save(Path(out_dir) / f"oracle_{k}.npy", arrays[k])


def _oracle_raw(d, split):
    """(B, I) true next-item distribution over the generator's items for the B targets of split
    ('val'/'test', in d.targets(split) order) and (B,) the true favourite genre name. d: a prepared
    synthetic folder (data.UserData)."""
    load = lambda k: np.load(d.path / f"oracle_{k}.npy", allow_pickle=False)
    world = World(load("item_genre"), load("pop"), load("successor"), d.meta["synthetic"]["p_seq"])
    t = d.targets(split)
    user = np.asarray(d.user_ids, np.int64)[d.user_of(t)] - 1  # raw user ids are 1..U
    pref = load("pref")[user, 0 if split == "val" else 1]  # (B, G)
    prev = np.asarray([0] + d.item_ids[1:], np.int64)[d.feats[0][t - 1]] - 1  # raw item index
    names = d.meta["synthetic"]["genre_names"]
    return next_item_probs(world, pref, prev), [names[g] for g in pref.argmax(1)]


def synthetic_oracle(d, split):
    """The oracle in the prepared ids: (B, V) true next-item probabilities over item ids (column 0,
    padding, and never-seen items get 0) and (B,) the true favourite genre id, for the B targets
    d.targets(split)."""
    p_raw, fav = _oracle_raw(d, split)
    probs = np.zeros((len(p_raw), d.vocab_sizes[0]))
    probs[:, 1:] = p_raw[:, np.asarray(d.item_ids[1:], np.int64) - 1]
    gid = {g: k for k, g in enumerate(d.genre_names)}
    return probs, np.array([gid.get(g, 0) for g in fav], np.int64)


def oracle_recall(d, split, ks=(1, 5, 10), targets=None):
    """The best achievable Recall@K, for each K in ks: the expected share of targets in the oracle's
    top K, i.e. the K largest true next-item probabilities (over the prepared item ids) summed and
    averaged over the targets: all of d.targets(split) ('val'/'test'), or the subset `targets` of
    them. Returns {'recall@K': value}."""
    probs, _ = synthetic_oracle(d, split)  # (B, V)
    if targets is not None:
        every = d.targets(split)  # sorted, the row order of probs
        if not np.isin(targets, every).all():
            raise ValueError(f"oracle_recall: every target must be one of d.targets({split!r})")
        probs = probs[np.searchsorted(every, targets)]
    top = -np.sort(-probs, axis=1)  # (B, V) true probabilities, largest first
    return {f"recall@{k}": float(top[:, :k].sum(1).mean()) for k in ks}
