"""
User timelines for User-LLM (paper Sec 4.1, datasets of Table 1): raw readers, an embedded synthetic default with a
known answer, prepare, leakage-free splits and vectorised batches.

    python data.py                                  # synthetic default -> data/synthetic (seconds, offline)
    python data.py --dataset=ml1m --download=True   # MovieLens 1M from grouplens.org -> data/ml1m
    python data.py --dataset=ml20m --strict=True    # the first bad row is an error naming file and line
    python data.py --bench=True                     # 20M-event prepare time / peak memory, batch examples/s

Datasets (raw files exactly as the publishers ship them, default folder data/raw/<name>/):
  synthetic                 generated here in MovieLens ml-20m format (+ reviews.csv), then read by the MovieLens reader
  ml20m ml25m ml-latest-small  ratings.csv + movies.csv         ml1m  ratings.dat + movies.dat (::, latin-1)
  ml100k                    u.data (tab) + u.item (|, latin-1, 19 genre flags)
  amazon_movies(_5)         Amazon Review 2018 Movies_and_TV(_5).json(.gz) + meta_Movies_and_TV.json.gz
  google_ny                 Google Local 2021 review-New_York.json.gz + meta-New_York.json.gz

A prepared folder holds numpy files + JSON (no pickle): meta.json, offsets.npy (n_users+1), one <feature>.npy per
feature (events of a user contiguous, sorted by time, stable on ties = file order), timestamps.npy, item_titles.json,
genre_names.json, user_ids.json, item_ids.json and, when the source has review texts, review_bytes.npy (uint8, utf-8)
+ review_offsets.npy + review_row.npy. Features are ['item', 'genre', 'rating'] (MovieLens, synthetic) or
['item', 'category', 'rating'] (Amazon, Google); id 0 is padding everywhere.

Documented decisions
- One genre per item: a MovieLens item with several genres gets its least frequent genre across the catalogue (the
  most specific one), ties to the first listed; "(no genres listed)" is a genre of its own. Amazon: the last element of
  the category list that is not the root "Movies & TV" (the root itself when nothing else is listed). Google: the
  first category (the place's primary category, the one Google Maps shows). Null/empty -> "(no category)".
- Rating feature: one id per distinct rating value present, ascending (MovieLens half stars -> 1..10).
- Favourite genre of a history window: the most frequent genre among its real (non-padding) events; a tie goes to
  the tied genre seen most recently. An empty window has favourite 0.
- Splits (Sec 4.1): per user the last event is the test target, the penultimate the validation target, every
  earlier event a training target. `min_history` keeps only targets with at least that many events before them (for
  every split, so min_history=N keeps the paper's users with >= N+1 events in test).
- Review text for generation: Amazon summary, the short opinion the paper generates ("Four Stars.", Sec 4.1 and
  App. E; reviewText only when the summary is missing or empty), Google text (null -> '').
- Bad input is counted per reason per file and printed as one summary line per file; duplicates are identical
  (user, item, timestamp) events (the first in file order is kept); users with < min_events events are dropped.
  Blank lines of JSON-lines files are skipped, not counted. --strict=True stops at the earliest bad line in file
  order, whatever found it. A truncated or corrupt .gz/.zip is always an error (re-download), never a partial read.
- history_text renders "Title, rating; Title, rating" oldest to newest, ratings as %g (4, 3.5) to save tokens.

Dimension letters: B batch (examples), N history length, G genres, I items.
"""
import csv
import gzip
import hashlib
import html
import json
import math
import os
import re
import shutil
import sys
import time
import types
import urllib.request
import warnings
import zipfile
import zlib
from array import array
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

DEFAULTS = dict(
    dataset='synthetic', raw_dir='', out_dir='', strict=False, download=False, min_events=3,
    # synthetic generator (Sec 3 of the issue: planted structure with an oracle)
    n_users=2000, n_items=500, n_genres=16, min_len=40, max_len=120, p_seq=0.4, p_drift=0.02, seed=1337,
    # benchmark (issue sec 7)
    bench=False, bench_events=20_000_000, bench_dir='data/bench',
)

ML = 'https://files.grouplens.org/datasets/movielens/'
UCSD = 'https://datarepo.eng.ucsd.edu/mcauley_group/'
# name -> reader kind and {raw file: URL}. The URLs are the public files as listed on the dataset pages; verify.
# For MovieLens the URL is the zip holding the file (download unzips it).
DATASETS = {
    'ml20m': ('movielens', {f: ML + 'ml-20m.zip' for f in ('ratings.csv', 'movies.csv')}),
    'ml25m': ('movielens', {f: ML + 'ml-25m.zip' for f in ('ratings.csv', 'movies.csv')}),
    'ml-latest-small': ('movielens', {f: ML + 'ml-latest-small.zip' for f in ('ratings.csv', 'movies.csv')}),
    'ml1m': ('movielens', {f: ML + 'ml-1m.zip' for f in ('ratings.dat', 'movies.dat')}),
    'ml100k': ('movielens', {f: ML + 'ml-100k.zip' for f in ('u.data', 'u.item')}),
    'amazon_movies': ('amazon', {
        'Movies_and_TV.json.gz': UCSD + 'data/amazon_v2/categoryFiles/Movies_and_TV.json.gz',
        'meta_Movies_and_TV.json.gz': UCSD + 'data/amazon_v2/metaFiles2/meta_Movies_and_TV.json.gz'}),
    'amazon_movies_5': ('amazon', {
        'Movies_and_TV_5.json.gz': UCSD + 'data/amazon_v2/categoryFilesSmall/Movies_and_TV_5.json.gz',
        'meta_Movies_and_TV.json.gz': UCSD + 'data/amazon_v2/metaFiles2/meta_Movies_and_TV.json.gz'}),
    'google_ny': ('google', {
        'review-New_York.json.gz': UCSD + 'gdrive/googlelocal/review-New_York.json.gz',
        'meta-New_York.json.gz': UCSD + 'gdrive/googlelocal/meta-New_York.json.gz'}),
}
ML100K_GENRES = ['unknown', 'Action', 'Adventure', 'Animation', "Children's", 'Comedy', 'Crime', 'Documentary',
                 'Drama', 'Fantasy', 'Film-Noir', 'Horror', 'Musical', 'Mystery', 'Romance', 'Sci-Fi', 'Thriller',
                 'War', 'Western']
NO_GENRE, NO_CATEGORY = '(no genres listed)', '(no category)'


def config(**overrides):
    """DEFAULTS with overrides, for calling prepare() from Python: data.prepare(data.config(n_users=300, ...))."""
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise SystemExit(f"data.config: unknown key(s) {sorted(unknown)}")
    return types.SimpleNamespace(**{**DEFAULTS, **overrides})


# ----------------------------------------------------------------------------------------------------------------------
# bad input (issue sec 6)

class Report:
    """Bad-input bookkeeping of one raw file: rows kept, rows dropped per reason, rows repaired per reason.
    strict=True turns the earliest problem in file order into a one-line SystemExit naming file and line. It is raised
    when `kept` is set, which closes the report: readers set it after reading, order_events after its vectorised
    checks. Raising at the first problem seen would be wrong: a duplicate found after reading can sit on an earlier
    line than a malformed line found while reading."""

    def __init__(self, path, strict=False):
        self.path, self.strict, self.first = Path(path), strict, None  # first: (line, reason) of the earliest problem
        self._kept, self.dropped, self.repaired = 0, Counter(), Counter()

    def drop(self, reason, line, n=1):
        self._note(reason, line)
        self.dropped[reason] += n

    def repair(self, reason, line):
        self._note(reason, line)
        self.repaired[reason] += 1

    def _note(self, reason, line):
        if self.strict and (self.first is None or line < self.first[0]):
            self.first = (int(line), reason)

    @property
    def kept(self):
        return self._kept

    @kept.setter
    def kept(self, n):
        self._kept = n
        if self.first:
            raise SystemExit(f"{self.path}:{self.first[0]}: {self.first[1]} (strict mode)")

    def summary(self):
        parts = lambda c: ', '.join(f"{k}: {v:,}" for k, v in sorted(c.items()))
        s = f"{self.path.name}: kept {self.kept:,}, dropped {sum(self.dropped.values()):,}"
        s += f" ({parts(self.dropped)})" if self.dropped else ""
        return s + (f"; repaired {parts(self.repaired)}" if self.repaired else "")


# ----------------------------------------------------------------------------------------------------------------------
# raw files: location, download (issue sec 2)

def download(url, dest, timeout=10):
    """Fetch url to dest with a progress bar; atomic (.part then rename). Offline: one-line SystemExit."""
    from tqdm import tqdm
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + '.part')
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(part, 'wb') as f:
            total = int(r.headers.get('Content-Length') or 0) or None
            with tqdm(total=total, unit='B', unit_scale=True, desc=dest.name, disable=total is None) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (OSError, ValueError) as e:  # URLError, timeouts and refused connections are all OSError
        part.unlink(missing_ok=True)
        raise SystemExit(f"could not download {dest.name} from {url} ({e}); download it by hand and put it at {dest}")
    os.replace(part, dest)
    return dest


def raw_file(raw_dir, name, url, fetch=False):
    """Path of a raw file; a gzipped file may also be present un-gzipped. Missing: download it or exit naming both."""
    p = Path(raw_dir) / name
    for cand in (p, p.with_suffix('') if p.suffix == '.gz' else p):
        if cand.exists():
            return cand
    if not fetch:
        how = f"unzip {url} into {p.parent}" if url.endswith('.zip') else f"download {url} to {p}"
        raise SystemExit(f"missing raw file {p}: {how} (or rerun with --download=True)")
    if not url.endswith('.zip'):
        return download(url, p)
    z = download(url, Path(raw_dir) / url.rsplit('/', 1)[1])
    try:
        _unzip_flat(z, raw_dir)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a download cut short, or damaged bytes
        raise SystemExit(f"{z}: the zip file is truncated or corrupt ({e}); rerun with --download=True to fetch "
                         "it again")
    if not p.exists():
        raise SystemExit(f"{z} does not contain {name}")
    return p


def _unzip_flat(z, raw_dir):
    """Extract the files of zip z into raw_dir without their folders (MovieLens zips hold one: ml-20m/...). Each goes
    to .part first, so a member that can't be read whole leaves no half file that a later run would take as raw."""
    with zipfile.ZipFile(z) as zf:
        for m in zf.infolist():
            if not m.is_dir():
                dst = Path(raw_dir) / Path(m.filename).name
                part = dst.with_name(dst.name + '.part')
                try:
                    with zf.open(m) as src, open(part, 'wb') as f:
                        shutil.copyfileobj(src, f)
                    os.replace(part, dst)
                finally:
                    part.unlink(missing_ok=True)  # still there only when the copy failed


# ----------------------------------------------------------------------------------------------------------------------
# raw readers: every reader returns RawEvents (events in file order + the item catalogue)

@dataclass
class RawEvents:
    user: np.ndarray            # (E,) int64 user key: the raw numeric id, or a code into user_names
    item: np.ndarray            # (E,) int64 index into the catalogue, -1 = unknown item
    ts: np.ndarray              # (E,) int64 seconds
    rating: np.ndarray          # (E,) float32
    line: np.ndarray            # (E,) int64 line of the event in the events file (for strict errors)
    item_ids: list              # catalogue: raw item id,
    item_titles: list           # its title,
    item_genre: list            # and its ONE genre/category name
    report: Report              # bad input of the events file
    other_reports: list         # bad input of the other files read
    user_names: list = None     # raw user id per code, when raw user ids are strings
    review_bytes: np.ndarray = None    # uint8 utf-8 texts, row order of the arrays above
    review_offsets: np.ndarray = None  # (E+1,) int64


def read_numeric(path, sep, dtypes, int_cols, report, header, chunk_bytes=1 << 26):
    """Fast reader for numeric delimited files (ratings): chunks are parsed by numpy in C; a chunk whose lines don't
    all have the right number of fields, or that numpy can't parse, is re-parsed line by line, counting bad lines.
    Returns one array per column (typed as dtypes) and the file line number of each row."""
    cols, lines, line_no, rest = [[] for _ in dtypes], [], 1, b''
    with open(path, 'rb') as f:
        if header:
            f.readline()
            line_no = 2
        while True:
            block = f.read(chunk_bytes)
            data = rest + block
            cut = data.rfind(b'\n') if block else len(data)
            if cut < 0:
                rest = data
                continue
            chunk, rest = data[:cut], data[cut + 1:]
            if chunk:
                x, ln = _parse_chunk(chunk, sep, len(dtypes), int_cols, report, line_no)  # (rows, fields)
                for j, (c, dt) in enumerate(zip(cols, dtypes)):
                    c.append(x[:, j].astype(dt))
                lines.append(ln)
            line_no += chunk.count(b'\n') + 1
            if not block:
                break
    cat = lambda a, dt: np.concatenate(a) if a else np.zeros(0, dt)
    return [cat(c, dt) for c, dt in zip(cols, dtypes)], cat(lines, np.int64)


def _parse_chunk(chunk, sep, n_fields, int_cols, report, first_line):
    """(rows, n_fields) float64 and line numbers of a chunk of whole lines (no trailing newline)."""
    n_lines = chunk.count(b'\n') + 1
    fast = chunk if sep == b',' else chunk.replace(sep, b',')
    if b'\r' in fast:
        fast = fast.replace(b'\r', b'')
    a = np.frombuffer(fast, np.uint8)
    commas = np.searchsorted(np.flatnonzero(a == 44), np.r_[-1, np.flatnonzero(a == 10), len(a)])
    if (np.diff(commas) == n_fields - 1).all():  # every line has the right number of fields
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # numpy warns (and stops) on text it cannot parse
            try:
                x = np.fromstring(fast.replace(b'\n', b','), dtype=np.float64, sep=',')
            except (ValueError, DeprecationWarning):
                x = np.zeros(0)
        if x.size == n_lines * n_fields:
            x = x.reshape(n_lines, n_fields)  # (rows, fields)
            if np.isfinite(x).all() and (x[:, int_cols] == np.floor(x[:, int_cols])).all():
                return x, first_line + np.arange(n_lines)
    return _parse_lines(chunk, sep, n_fields, int_cols, report, first_line)


def _parse_lines(chunk, sep, n_fields, int_cols, report, first_line):
    """The slow path: one line at a time, every bad line counted (or, strict, the first one an error)."""
    rows, lines = [], []
    for k, raw in enumerate(chunk.split(b'\n')):
        ln, raw = first_line + k, raw.rstrip(b'\r')
        try:
            raw.decode('utf-8')
        except UnicodeDecodeError:
            report.drop('invalid utf-8', ln)
            continue
        parts = raw.split(sep)
        if len(parts) != n_fields:
            report.drop('malformed line', ln)
            continue
        if not all(p.strip() for p in parts):
            report.drop('missing field', ln)
            continue
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            report.drop('malformed line', ln)
            continue
        if not all(map(math.isfinite, vals)) or any(vals[c] != int(vals[c]) for c in int_cols):
            report.drop('malformed line', ln)
            continue
        rows.append(vals)
        lines.append(ln)
    return np.array(rows, np.float64).reshape(-1, n_fields), np.array(lines, np.int64)


def _text_lines(path, report, encoding):
    """Yield (line number, str) of a text file; utf-8 lines that aren't valid utf-8 are repaired and counted."""
    with open(path, 'rb') as f:
        for ln, b in enumerate(f, 1):
            try:
                s = b.decode(encoding)
            except UnicodeDecodeError:
                report.repair('invalid utf-8', ln)
                s = b.decode(encoding, 'replace')
            yield ln, s.rstrip('\r\n')


def read_movielens_items(path, report):
    """MovieLens catalogue: movies.csv (quoted titles, '|' genres), movies.dat (::, latin-1) or u.item (|, latin-1,
    19 genre flags). Returns raw ids, titles and genre lists, in file order."""
    name = Path(path).name
    lines = _text_lines(path, report, 'utf-8' if name.endswith('.csv') else 'latin-1')
    if name.endswith('.csv'):
        next(lines, None)  # header movieId,title,genres
        reader = csv.reader(s for _, s in lines)  # handles "Title, The (1995)" quoting
        rows = ((reader.line_num + 1, row) for row in reader)
    else:
        rows = ((ln, s.split('::' if name.endswith('.dat') else '|')) for ln, s in lines)
    ids, titles, genres, seen = [], [], [], set()
    n_fields = 24 if name == 'u.item' else 3
    for ln, row in rows:
        if not any(row):
            report.drop('malformed line', ln)
            continue
        if len(row) != n_fields or not row[0].strip().isdecimal():  # isdigit() passes '²', which int() refuses
            report.drop('malformed line', ln)
            continue
        if not row[1].strip():
            report.drop('missing field', ln)
            continue
        if int(row[0]) in seen:
            report.drop('duplicate', ln)
            continue
        if n_fields == 24:
            g = [ML100K_GENRES[k] for k, flag in enumerate(row[5:]) if flag.strip() == '1']
        else:
            g = [x for x in row[2].split('|') if x.strip()]
        seen.add(int(row[0]))
        ids.append(int(row[0]))
        titles.append(row[1].strip())
        genres.append(g or [NO_GENRE])
    report.kept = len(ids)
    return ids, titles, genres


def most_specific_genre(genres):
    """One genre per item: its least frequent genre across the catalogue (the most specific), ties to the first
    listed. genres: list of genre-name lists -> list of names."""
    freq = Counter(g for gs in genres for g in set(gs))
    return [min(gs, key=lambda g: freq[g]) for gs in genres]  # min keeps the first of equal keys


def read_movielens(raw_dir, name, strict=False, fetch=False):
    """MovieLens in any of its shipped formats (+ the synthetic reviews.csv when present) -> RawEvents."""
    files = DATASETS.get(name, DATASETS['ml20m'])[1]  # the synthetic default is in ml-20m format
    (ev_name, url), (it_name, it_url) = files.items()
    ev_path, it_path = raw_file(raw_dir, ev_name, url, fetch), raw_file(raw_dir, it_name, it_url, fetch)
    it_report, report = Report(it_path, strict), Report(ev_path, strict)
    ids, titles, genres = read_movielens_items(it_path, it_report)
    sep = {'.csv': b',', '.dat': b'::'}.get(ev_path.suffix, b'\t')
    (user, raw_item, rating, ts), line = read_numeric(ev_path, sep, (np.int64, np.int64, np.float32, np.int64),
                                                      [0, 1, 3], report, header=ev_path.suffix == '.csv')
    lut = np.full(max(ids, default=0) + 2, -1, np.int64)  # raw movie id -> catalogue index; last slot = unknown
    lut[np.array(ids, np.int64)] = np.arange(len(ids))
    item = lut[np.where((raw_item >= 0) & (raw_item < len(lut)), raw_item, len(lut) - 1)]
    raw = RawEvents(user, item, ts, rating, line, ids, titles, most_specific_genre(genres), report, [it_report])
    rev_path = Path(raw_dir) / 'reviews.csv'
    if rev_path.exists():
        _attach_reviews(raw, raw_item, rev_path, strict)
    return raw


def _attach_reviews(raw, raw_item, path, strict):
    """reviews.csv (userId,movieId,timestamp,text; written by the synthetic generator): texts joined to ratings on
    (user, item, timestamp)."""
    report, texts = Report(path, strict), {}
    lines = _text_lines(path, report, 'utf-8')
    next(lines, None)
    reader = csv.reader(s for _, s in lines)
    for row in reader:
        try:
            key = (int(row[0]), int(row[1]), int(row[2]))
        except (ValueError, IndexError):
            report.drop('malformed line', reader.line_num + 1)
            continue
        texts.setdefault(key, (reader.line_num + 1, row[3] if len(row) > 3 else ''))  # (line, text)
    keys = zip(raw.user.tolist(), raw_item.tolist(), raw.ts.tolist())
    enc = [texts.pop(k, (0, ''))[1].encode() for k in keys]
    if texts:  # texts of no rating: counted at the first one's line, the line strict mode names
        report.drop('unknown id', min(ln for ln, _ in texts.values()), len(texts))
    report.kept = sum(map(bool, enc))
    raw.review_offsets = np.r_[0, np.cumsum([len(b) for b in enc])].astype(np.int64)
    raw.review_bytes = np.frombuffer(b''.join(enc), np.uint8)
    raw.other_reports.append(report)


def json_lines(path, report):
    """Yield (line number, dict) of a JSON-lines file, gzipped or not (told by its magic bytes, not its name). Blank
    lines are skipped uncounted (an editor's trailing newline is not bad data)."""
    for ln, b in _raw_lines(path):
        try:
            s = b.decode('utf-8')
        except UnicodeDecodeError:
            report.repair('invalid utf-8', ln)
            s = b.decode('utf-8', 'replace')
        if not s.strip():
            continue
        try:
            obj = json.loads(s)
        except (ValueError, RecursionError):  # RecursionError: absurdly nested brackets, e.g. random bytes
            obj = None
        if not isinstance(obj, dict):
            report.drop('malformed line', ln)
            continue
        yield ln, obj


def _raw_lines(path):
    """Yield (line number, bytes) of a file, gunzipped when it starts with the gzip magic bytes. A truncated or corrupt
    gzip file is a one-line SystemExit naming the last whole line read: its tail is lost, so the user must fetch it
    again (a partial read would silently prepare a different dataset)."""
    with open(path, 'rb') as f:
        gz = f.read(2) == b'\x1f\x8b'
    ln = 0
    try:
        with (gzip.open(path, 'rb') if gz else open(path, 'rb')) as f:
            for ln, b in enumerate(f, 1):
                yield ln, b
    except EOFError:
        raise SystemExit(f"{path}: the gzip file ends early (truncated?) after line {ln:,}; re-download it") from None
    except (zlib.error, gzip.BadGzipFile) as e:
        raise SystemExit(f"{path}: the gzip file is corrupt after line {ln:,} ({e}); re-download it") from None


def clean_title(title, fallback):
    """Publisher titles may be HTML, empty or null: strip tags, unescape entities, fall back, cap the length."""
    if not isinstance(title, str):
        return fallback
    title = ' '.join(html.unescape(re.sub(r'<[^>]*>', ' ', title)).split())
    return title[:200] if title else fallback


# field names of the two JSON sources; `pick` chooses one category from the list (see the docstring); `text`: the
# review-generation target, the first non-blank field listed (Amazon: the summary the paper generates, Sec 4.1)
AMAZON = dict(user='reviewerID', item='asin', rating='overall', time='unixReviewTime', ms=False,
              text=('summary', 'reviewText'), title='title', fallback='Item {}',
              pick=lambda c: c[-1] if len(c) > 1 else c[0])
GOOGLE = dict(user='user_id', item='gmap_id', rating='rating', time='time', ms=True,
              text=('text',), title='name', fallback='Place {}', pick=lambda c: c[0])


def read_json_source(review_path, meta_path, src, strict=False):
    """Amazon Review 2018 / Google Local 2021: review JSON lines + item metadata JSON lines -> RawEvents.
    Items reviewed but absent from the metadata keep a fallback title ('Item <asin>') and '(no category)'."""
    meta_report, report = Report(meta_path, strict), Report(review_path, strict)
    index, titles, cats = {}, [], []
    for ln, m in json_lines(meta_path, meta_report):
        key = m.get(src['item'])
        if not isinstance(key, str) or not key:
            meta_report.drop('missing field', ln)
            continue
        if key in index:
            meta_report.drop('duplicate', ln)
            continue
        c = m.get('category')
        c = [html.unescape(x).strip() for x in (c if isinstance(c, list) else [c]) if isinstance(x, str) and x.strip()]
        index[key] = len(titles)
        titles.append(clean_title(m.get(src['title']), src['fallback'].format(key)))
        cats.append(src['pick'](c) if c else NO_CATEGORY)
    meta_report.kept = len(titles)
    users, user, item, ts, rating, line = {}, array('q'), array('q'), array('q'), array('f'), array('q')
    texts, offsets = bytearray(), array('q', [0])
    for ln, r in json_lines(review_path, report):
        ev = _review_event(r, src)
        if isinstance(ev, str):
            report.drop(ev, ln)
            continue
        u, i, y, t = ev
        if i not in index:
            index[i] = len(titles)
            titles.append(src['fallback'].format(i))
            cats.append(NO_CATEGORY)
            report.repaired['item without metadata (fallback title)'] += 1  # expected, so not a strict-mode error
        user.append(users.setdefault(u, len(users)))
        item.append(index[i]), ts.append(t), rating.append(y), line.append(ln)
        text = next((r[k] for k in src['text'] if isinstance(r.get(k), str) and r[k].strip()), '')
        texts += text.encode('utf-8', 'replace')
        offsets.append(len(texts))
    arr = lambda a, dt: np.frombuffer(a, dt).copy() if len(a) else np.zeros(0, dt)
    return RawEvents(arr(user, np.int64), arr(item, np.int64), arr(ts, np.int64), arr(rating, np.float32),
                     arr(line, np.int64), list(index), titles, cats, report, [meta_report], user_names=list(users),
                     review_bytes=arr(texts, np.uint8), review_offsets=arr(offsets, np.int64))


def _review_event(r, src):
    """(user, item, rating, seconds) of a review row, or the reason it is dropped."""
    u, i, y, t = (r.get(src[k]) for k in ('user', 'item', 'rating', 'time'))
    if any(v is None or v == '' for v in (u, i, y, t)):
        return 'missing field'
    try:
        y, t = float(y), int(t) // (1000 if src['ms'] else 1)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int() of an infinite time (1e999 in the JSON)
        return 'malformed line'
    if not math.isfinite(y) or not -2 ** 63 <= t < 2 ** 63:  # a NaN rating, or a time no int64 column can hold
        return 'malformed line'
    return str(u), str(i), y, t


# ----------------------------------------------------------------------------------------------------------------------
# prepare (issue sec 4): sort, drop duplicates and short users, build vocabularies, write the folder

def _drop(report, reason, lines):
    """Vectorised drops: counted, or in strict mode an error at the first offending line."""
    if len(lines):
        report.drop(reason, int(lines.min()), len(lines))


def order_events(raw, min_events):
    """Event order of the prepared folder: by user, then time, stable on ties (file order); identical
    (user, item, time) events and users with < min_events events dropped and counted. Returns (order, lengths)."""
    rep = raw.report
    known = np.flatnonzero(raw.item >= 0)
    _drop(rep, 'unknown id', raw.line[raw.item < 0])
    order = known[np.lexsort((raw.ts[known], raw.user[known]))]  # lexsort is stable: file order on ties
    u, t, it = raw.user[order], raw.ts[order], raw.item[order]
    tie = (u[1:] == u[:-1]) & (t[1:] == t[:-1])  # event k+1 has the same (user, time) as event k
    if tie.any():  # duplicates can only sit inside a run of tied (user, time): look only there
        run = np.cumsum(np.r_[True, ~tie])  # run id per event
        cand = np.flatnonzero(np.r_[tie, False] | np.r_[False, tie])
        cand = cand[np.lexsort((it[cand], run[cand]))]  # stable: the first in file order comes first
        dup = cand[1:][(run[cand][1:] == run[cand][:-1]) & (it[cand][1:] == it[cand][:-1])]
        _drop(rep, 'duplicate', raw.line[order[dup]])
        keep = np.ones(len(order), bool)
        keep[dup] = False
        order, u = order[keep], u[keep]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if len(u) else np.zeros(0, np.int64)
    lengths = np.diff(np.r_[starts, len(u)])
    short = np.repeat(lengths < min_events, lengths)
    _drop(rep, f'short user (< {min_events} events; {int((lengths < min_events).sum()):,} users)', raw.line[order[short]])
    rep.kept = int((~short).sum())
    return order[~short], lengths[lengths >= min_events]


def write_prepared(raw, out_dir, name, features, min_events=3, extra_meta=None):
    """RawEvents -> the prepared folder (vocabularies with 0 = padding, flat arrays + offsets). Returns its path."""
    order, lengths = order_events(raw, min_events)
    if not len(lengths):
        raise SystemExit(f"{raw.report.summary()}: no user has {min_events} events or more, nothing to prepare")
    starts = np.cumsum(lengths) - lengths  # (users,) first event of each user
    item = raw.item[order]
    present = np.bincount(item, minlength=len(raw.item_ids)) > 0  # vocabulary = items with a kept event
    item_vocab = np.cumsum(present) * present  # catalogue index -> item id (1..), 0 if absent
    genres = sorted({raw.item_genre[i] for i in np.flatnonzero(present)})
    genre_id = {g: k + 1 for k, g in enumerate(genres)}
    item_genre = np.array([genre_id.get(g, 0) for g in raw.item_genre], np.int64)
    rating_values, rating_id = np.unique(raw.rating[order], return_inverse=True)
    cols = {features[0]: item_vocab[item], features[1]: item_genre[item], 'rating': rating_id.reshape(-1) + 1}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f, v in cols.items():
        np.save(out / f'{f}.npy', v.astype(_int_dtype(v.max(initial=0))))
    np.save(out / 'offsets.npy', np.r_[0, np.cumsum(lengths)].astype(np.int64))
    np.save(out / 'timestamps.npy', raw.ts[order])
    user_keys = raw.user[order[starts]].tolist()
    _dump(out / 'user_ids.json', [raw.user_names[k] for k in user_keys] if raw.user_names else user_keys)
    _dump(out / 'item_ids.json', [None] + [raw.item_ids[i] for i in np.flatnonzero(present)])
    _dump(out / 'item_titles.json', ['<pad>'] + [raw.item_titles[i] for i in np.flatnonzero(present)])
    _dump(out / 'genre_names.json', ['<pad>'] + genres)
    has_reviews = raw.review_bytes is not None and len(raw.review_bytes) > 0
    if has_reviews:  # texts stay in file-row order; review_row maps each prepared event to its row
        np.save(out / 'review_bytes.npy', raw.review_bytes)
        np.save(out / 'review_offsets.npy', raw.review_offsets)
        np.save(out / 'review_row.npy', order.astype(np.int64))
    reports = raw.other_reports + [raw.report]
    for r in reports:
        print(r.summary())
    meta = dict(dataset=name, features=features, vocab_sizes=[int(present.sum()) + 1, len(genres) + 1,
                len(rating_values) + 1], n_users=len(lengths), n_events=len(order),
                rating_values=[float(x) for x in rating_values], has_reviews=has_reviews, min_events=min_events,
                bad_input=[r.summary() for r in reports], **(extra_meta or {}))
    _dump(out / 'meta.json', meta)
    return out


def _int_dtype(vmax):
    return next(dt for dt in (np.int8, np.int16, np.int32, np.int64) if vmax <= np.iinfo(dt).max)


def _dump(path, obj):
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(obj, f, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------------------------------
# the prepared dataset: splits and examples (issue sec 5, paper Sec 4.1)

class UserData:
    """A prepared folder in memory. Examples are cut on the fly from offsets, never materialised."""

    def __init__(self, path):
        self.path = Path(path)
        if not (self.path / 'meta.json').exists():
            raise SystemExit(f"no prepared dataset at {self.path}: run `python data.py --dataset=NAME` first")
        load = lambda name, mmap=None: np.load(self.path / name, allow_pickle=False, mmap_mode=mmap)
        self.meta = json.loads((self.path / 'meta.json').read_text())
        self.features = self.meta['features']
        self.vocab_sizes = tuple(self.meta['vocab_sizes'])
        self.offsets = load('offsets.npy')
        self.n_users = len(self.offsets) - 1
        self.feats = tuple(load(f'{f}.npy') for f in self.features)
        self.timestamps = load('timestamps.npy', 'r')
        self.item_titles, self.genre_names, self.user_ids, self.item_ids = (
            json.loads((self.path / f).read_text(encoding='utf-8'))
            for f in ('item_titles.json', 'genre_names.json', 'user_ids.json', 'item_ids.json'))
        self.rating_values = [0.0] + self.meta['rating_values']  # rating id -> value
        if self.meta['has_reviews']:
            self._reviews = [load(f, 'r') for f in ('review_bytes.npy', 'review_offsets.npy', 'review_row.npy')]

    def fingerprint(self):
        """What identifies this prepared dataset: stored in every checkpoint, compared (common.check_data) whenever a
        checkpoint is used with data, so that a model is never scored on, or continued with, data it was not made for."""
        h = hashlib.sha256()
        for a in (self.offsets, *self.feats):
            h.update(np.ascontiguousarray(a).tobytes())
        return dict(dataset=self.meta['dataset'], path=str(self.path.resolve()), vocab_sizes=list(self.vocab_sizes),
                    n_users=int(self.n_users), n_events=int(self.offsets[-1]), sha256=h.hexdigest()[:16])

    def user_of(self, events):
        """User index of flat event indices."""
        return np.searchsorted(self.offsets, events, side='right') - 1

    def targets(self, split, min_history=1):
        """Flat event indices of the targets of a split: 'test' = each user's last event, 'val' = the penultimate,
        'train' = every earlier event. Only targets with >= min_history events before them are kept."""
        starts, lengths = self.offsets[:-1], np.diff(self.offsets)
        if split == 'train':
            pos = np.arange(self.offsets[-1]) - np.repeat(starts, lengths)  # position of each event in its user
            return np.flatnonzero((pos >= min_history) & (pos <= np.repeat(lengths - 3, lengths)))
        if split not in ('val', 'test'):
            raise ValueError(f"split must be 'train', 'val' or 'test', not {split!r}")
        t = self.offsets[1:] - (2 if split == 'val' else 1)
        return t[t - starts >= min_history].astype(np.int64)

    def windows(self, targets, N):
        """(B, N) flat indices of the up-to-N events before each target (oldest first) and (B, N) bool real mask;
        left padding has index 0 and mask False."""
        t = np.asarray(targets, np.int64)
        start = self.offsets[self.user_of(t)]
        idx = t[:, None] + np.arange(-N, 0)  # (B, N)
        real = idx >= start[:, None]  # (B, N) never reaches into the previous user
        return np.where(real, idx, 0), real

    def batch(self, targets, N):
        """Model inputs for targets: hist (per feature (B, N), left-padded with 0), target (per feature (B,)) and
        fav (B,) the favourite genre/category of the window. All int64 CPU tensors."""
        t = np.asarray(targets, np.int64)
        idx, real = self.windows(t, N)
        hist = [np.where(real, f[idx], 0) for f in self.feats]  # each (B, N)
        as_t = lambda a: torch.from_numpy(a.astype(np.int64))
        return dict(hist=tuple(map(as_t, hist)), target=tuple(as_t(f[t]) for f in self.feats),
                    fav=as_t(favourite(hist[1])))

    def history_text(self, target, k):
        """'Title, rating; Title, rating; ...' of the last k events before target, oldest to newest (TextPrompt)."""
        t = int(target)
        lo = max(int(self.offsets[self.user_of(t)]), t - k)
        item, rating = self.feats[0], self.feats[2]
        return '; '.join(f"{self.item_titles[item[j]]}, {self.rating_values[rating[j]]:g}" for j in range(lo, t))

    def review(self, target):
        """The user's review text of the target event ('' when the dataset has none)."""
        if not self.meta['has_reviews']:
            return ''
        buf, off, row = self._reviews
        r = int(row[int(target)])
        return bytes(buf[off[r]:off[r + 1]]).decode('utf-8', 'replace')


def favourite(genres):
    """(B, N) genre ids (0 = padding) -> (B,) the most frequent genre of each row; a tie goes to the tied genre seen
    most recently (rightmost). An all-padding row gives 0. Vectorised with one bincount over (row, genre) keys."""
    B, N = genres.shape
    G, rows = int(genres.max(initial=0)) + 1, np.arange(B)
    count = np.bincount((rows[:, None] * G + genres).ravel(), minlength=B * G).reshape(B, G)  # (B, G)
    count[:, 0] = 0  # padding never wins
    best = (count[rows[:, None], genres] == count.max(1, keepdims=True)) & (genres > 0)  # (B, N) holds a top genre
    last = N - 1 - best[:, ::-1].argmax(1)  # (B,) the rightmost such position
    return np.where(best.any(1), genres[rows, last], 0)


@lru_cache(maxsize=2)
def _epoch_permutation(seed, epoch, n):
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_targets(targets, step, batch_size, seed):
    """The global batch of a training step: positions step*B .. step*B+B-1 of an endless stream of epochs, each
    epoch a permutation seeded by (seed, epoch). A function of (seed, step) only, so training resumes from the step
    and every world size sees the same global batch (each rank takes a slice)."""
    n = len(targets)
    pos = step * batch_size + np.arange(batch_size)
    epoch, within = pos // n, pos % n
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epoch):
        m = epoch == e
        out[m] = targets[_epoch_permutation(seed, int(e), n)[within[m]]]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# the embedded default: a synthetic dataset with a known answer (issue sec 3)

GENRES = ['Action', 'Adventure', 'Animation', 'Children', 'Crime', 'Documentary', 'Fantasy', 'Film-Noir', 'Horror',
          'Musical', 'Mystery', 'Romance', 'Sci-Fi', 'Thriller', 'War', 'Western', 'IMAX']
BROAD = ('Drama', 'Comedy')  # extra genres carried by many items: never the least frequent, so never the feature


@dataclass
class World:
    """The generator's ground truth about items: the next item is the previous item's successor with probability
    p_seq, otherwise genre ~ the user's preference and item ~ popularity within that genre."""
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
    successor = (np.arange(n_items) + rng.integers(1, n_items, n_items)) % n_items  # never the item itself
    return World(item_genre, pop, successor, p_seq)


def next_item_probs(world, pref, prev):
    """The oracle: (B, G) genre preferences and (B,) previous items (-1 = none) -> (B, I) true next-item probs."""
    p = pref[:, world.item_genre] * world.pop  # (B, I)
    has = np.flatnonzero(prev >= 0)
    p[has] *= 1 - world.p_seq
    p[has, world.successor[prev[has]]] += world.p_seq
    return p


def sample_next(world, pref, prev, rng):
    """Draw one next item per row from next_item_probs, without forming the (B, I) matrix."""
    B = len(pref)
    genre = (rng.random(B)[:, None] < np.cumsum(pref, 1)).argmax(1)  # (B,) genre ~ pref
    order = np.argsort(world.item_genre, kind='stable')  # items grouped by genre
    cdf = world.item_genre[order] + _cumsum_within(world.pop[order], world.item_genre[order])
    lo = np.searchsorted(world.item_genre[order], genre, 'left')
    hi = np.searchsorted(world.item_genre[order], genre, 'right') - 1
    pick = np.clip(np.searchsorted(cdf, genre + rng.random(B), 'right'), lo, hi)  # item ~ pop within genre
    seq = (prev >= 0) & (rng.random(B) < world.p_seq)
    return np.where(seq, world.successor[np.maximum(prev, 0)], order[pick])


def _cumsum_within(x, group):
    """Cumulative sum of x restarting at every new value of the sorted array group."""
    c = np.cumsum(x)
    first = np.r_[0, np.flatnonzero(group[1:] != group[:-1]) + 1]
    return c - np.repeat(np.r_[0, c[first[1:] - 1]], np.diff(np.r_[first, len(x)]))


def _preference(favs, weights, n_genres, eps=0.1):
    """(U, F) favourite genres and their weights -> (U, G) preference: 1-eps on the favourites, eps spread evenly."""
    pref = np.full((len(favs), n_genres), eps / n_genres)
    np.add.at(pref, (np.arange(len(favs))[:, None], favs), (1 - eps) * weights)
    return pref


def generate_synthetic(raw_dir, n_users, n_items, n_genres, min_len, max_len, p_seq, p_drift, seed):
    """Write MovieLens-format ratings.csv / movies.csv / reviews.csv with planted structure; return the oracle:
    the World and (U, 2, G) preferences in force at each user's validation and test targets."""
    if n_genres < 3 or n_items < n_genres:
        raise SystemExit(f"synthetic data needs n_genres >= 3 and n_items >= n_genres (got {n_genres}, {n_items})")
    rng = np.random.default_rng(seed)
    world = make_world(n_items, n_genres, p_seq, rng)
    U, T = n_users, max_len
    lengths = rng.integers(min_len, max_len + 1, U)
    favs = np.argsort(rng.random((U, n_genres)), 1)[:, :3]  # (U, 3) distinct favourite genres
    weights = rng.dirichlet(np.ones(3), U) * (np.arange(3) < rng.integers(2, 4, U)[:, None])  # 2 or 3 favourites
    weights /= weights.sum(1, keepdims=True)
    items, ratings, oracle_pref, prev = np.zeros((U, T), np.int64), np.zeros((U, T)), np.zeros((U, 2, n_genres)), -np.ones(U, np.int64)
    quality = rng.normal(0, 0.5, n_items)
    for t in range(T):
        swap = (rng.random(U) < p_drift) & (t > 0)  # drift: a favourite is replaced by a genre not yet favoured
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
    ts = rng.integers(946684800, 1262304000, U)[:, None] + np.cumsum(rng.integers(60, 3 * 86400, (U, T)), 1)
    valid = np.arange(T) < lengths[:, None]
    user = np.broadcast_to(np.arange(1, U + 1)[:, None], (U, T))[valid]
    item, rating, ts = items[valid] + 1, ratings[valid], ts[valid]
    order = np.lexsort((item, user))  # ml-20m's own order: by user, then movie id (not by time)
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    write_ratings_csv(raw_dir / 'ratings.csv', user[order], item[order], rating[order], ts[order])
    names = (GENRES + [f'Genre {k}' for k in range(len(GENRES), n_genres)])[:n_genres]
    titles = _write_movies_csv(raw_dir / 'movies.csv', world, names, rng)
    _write_reviews_csv(raw_dir / 'reviews.csv', user, item, rating, ts, titles, [names[g] for g in world.item_genre], rng)
    return world, oracle_pref, names


GENRE_WORDS = ['Fist', 'Quest', 'Cartoon', 'Puppy', 'Heist', 'Truth', 'Wizard', 'Shadow', 'Scream', 'Melody', 'Secret',
               'Kiss', 'Robot', 'Fear', 'Battle', 'Frontier', 'Saga', 'Nebula', 'Tears', 'Laugh']


def _write_movies_csv(path, world, names, rng):
    """Titles like MovieLens ('Quiet Storm, The (1994)' needs quoting); the planted genre plus broad extra genres.
    A title's first word names its planted genre (as real titles hint at theirs), so a language model that knows the
    user's taste can begin the right titles; the second word is random and the number makes each title unique."""
    words = ['Quiet', 'Storm', 'Last', 'River', 'Night', 'Heart', 'Iron', 'Summer', 'Ghost', 'City', 'Dream', 'Road']
    rows, titles = [], []
    for i, g in enumerate(world.item_genre):
        w = rng.choice(words, 2, replace=False)
        first = GENRE_WORDS[g % len(GENRE_WORDS)]
        title = f"{first} {w[0]} {i + 1}{', The' if i % 5 == 0 else ''} ({1950 + i % 70})"
        extra = [] if i % 10 == 9 else [BROAD[i % 2]]  # ~40% of items each: more than any planted genre
        gs = extra + [names[g]] if i % 2 else [names[g]] + extra  # the planted genre is not always listed first
        rows.append((i + 1, title, '|'.join(gs)))
        titles.append(title)
    with open(path, 'w', newline='', encoding='utf-8') as f:
        w = csv.writer(f, lineterminator='\n')
        w.writerow(('movieId', 'title', 'genres'))
        w.writerows(rows)
    got = most_specific_genre([r[2].split('|') for r in rows])
    assert got == [names[g] for g in world.item_genre], 'broad genres must outnumber every planted genre'
    return titles


def _write_reviews_csv(path, user, item, rating, ts, titles, genre_of, rng):
    """Templated review texts that depend on rating and genre, so review generation can be demoed offline."""
    good = ['Loved it. {t} is a great {g} film, I would watch it again.', 'A wonderful {g} story; {t} never drags.']
    mid = ['{t} was fine: a decent {g} film with a few slow parts.', 'An average {g} movie. {t} is watchable.']
    bad = ['Not for me. {t} felt like a weak {g} film.', '{t} is a dull {g} movie; I stopped caring early.']
    pick = rng.integers(0, 2, len(user))
    with open(path, 'w', newline='', encoding='utf-8') as f:
        w = csv.writer(f, lineterminator='\n')
        w.writerow(('userId', 'movieId', 'timestamp', 'text'))
        for u, i, r, t, k in zip(user.tolist(), item.tolist(), rating.tolist(), ts.tolist(), pick.tolist()):
            tmpl = (good if r >= 4 else mid if r >= 3 else bad)[k]
            w.writerow((u, i, t, tmpl.format(t=titles[i - 1], g=genre_of[i - 1].lower())))


def write_ratings_csv(path, user, item, rating, ts, chunk=1 << 20):
    """ml-20m ratings.csv ('userId,movieId,rating,timestamp', one-decimal ratings) written with numpy, so the
    20M-row benchmark file takes seconds: each row is laid out in a byte matrix whose padding is masked away."""
    stars = np.array([list(f'{k / 2:.1f}'.encode()) for k in range(11)], np.uint8)  # (11, 3) b'0.0'..b'5.0'
    with open(path, 'wb') as f:
        f.write(b'userId,movieId,rating,timestamp\n')
        for s in range(0, len(user), chunk):
            n = len(user[s:s + chunk])
            const = lambda c: (np.full((n, 1), c, np.uint8), np.ones((n, 1), bool))
            star = (stars[np.rint(np.asarray(rating[s:s + chunk]) * 2).astype(int)], np.ones((n, 3), bool))
            parts = [_ascii_digits(user[s:s + chunk]), const(44), _ascii_digits(item[s:s + chunk]), const(44), star,
                     const(44), _ascii_digits(ts[s:s + chunk]), const(10)]
            mat, mask = (np.concatenate(p, 1) for p in zip(*parts))  # (n, width) bytes and which are real
            f.write(mat[mask].tobytes())  # row-major boolean indexing keeps the byte order


def _ascii_digits(x):
    """(n,) non-negative ints -> (n, W) right-aligned ascii digits and (n, W) mask of the real (non-leading) ones."""
    x = np.asarray(x, np.int64)
    W = len(str(int(x.max(initial=0))))
    pw = 10 ** np.arange(W - 1, -1, -1, dtype=np.int64)  # (W,)
    nd = 1 + (x[:, None] >= pw[None, :-1]).sum(1)  # digits per number
    return ((x[:, None] // pw) % 10 + 48).astype(np.uint8), np.arange(W) >= (W - nd)[:, None]


def _oracle_raw(d, split):
    """(T, I) true next-item distribution over the generator's items for the targets of split ('val'/'test', in
    d.targets(split) order) and (T,) the true favourite genre name."""
    load = lambda k: np.load(d.path / f'oracle_{k}.npy', allow_pickle=False)
    world = World(load('item_genre'), load('pop'), load('successor'), d.meta['synthetic']['p_seq'])
    t = d.targets(split)
    user = np.asarray(d.user_ids, np.int64)[d.user_of(t)] - 1  # raw user ids are 1..U
    pref = load('pref')[user, 0 if split == 'val' else 1]  # (T, G)
    prev = np.asarray([0] + d.item_ids[1:], np.int64)[d.feats[0][t - 1]] - 1  # raw item index
    names = d.meta['synthetic']['genre_names']
    return next_item_probs(world, pref, prev), [names[g] for g in pref.argmax(1)]


def synthetic_oracle(d, split):
    """The oracle in the prepared ids: (T, V) true next-item probabilities over item ids (column 0, padding, and
    never-seen items get 0) and (T,) the true favourite genre id, for d.targets(split)."""
    p_raw, fav = _oracle_raw(d, split)
    probs = np.zeros((len(p_raw), d.vocab_sizes[0]))
    probs[:, 1:] = p_raw[:, np.asarray(d.item_ids[1:], np.int64) - 1]
    gid = {g: k for k, g in enumerate(d.genre_names)}
    return probs, np.array([gid.get(g, 0) for g in fav], np.int64)


def oracle_recall(d, split, K):
    """The best achievable Recall@K: the probability that the true target is in the oracle's top K."""
    p_raw, _ = _oracle_raw(d, split)
    return float(np.sort(p_raw, 1)[:, -K:].sum(1).mean())


# ----------------------------------------------------------------------------------------------------------------------
# prepare, benchmark, command line

def prepare(cfg):
    """Read a dataset's raw files and write its prepared folder; returns the folder's path."""
    name = cfg.dataset
    if name != 'synthetic' and name not in DATASETS:
        raise SystemExit(f"unknown dataset '{name}': choose from synthetic, {', '.join(DATASETS)}")
    raw_dir, out_dir = cfg.raw_dir or f'data/raw/{name}', cfg.out_dir or f'data/{name}'
    if name == 'synthetic':
        keys = ('n_users', 'n_items', 'n_genres', 'min_len', 'max_len', 'p_seq', 'p_drift', 'seed')
        params = {k: getattr(cfg, k) for k in keys}
        world, pref, names = generate_synthetic(raw_dir, **params)
        raw = read_movielens(raw_dir, name, cfg.strict)
        out = write_prepared(raw, out_dir, name, ['item', 'genre', 'rating'], cfg.min_events,
                             dict(synthetic=dict(params, genre_names=names)))
        for k, v in dict(item_genre=world.item_genre, pop=world.pop, successor=world.successor, pref=pref).items():
            np.save(out / f'oracle_{k}.npy', v)
        return out
    kind, files = DATASETS[name]
    if kind == 'movielens':
        raw, features = read_movielens(raw_dir, name, cfg.strict, cfg.download), ['item', 'genre', 'rating']
    else:
        (rev, rev_url), (meta, meta_url) = files.items()
        paths = raw_file(raw_dir, rev, rev_url, cfg.download), raw_file(raw_dir, meta, meta_url, cfg.download)
        raw = read_json_source(*paths, AMAZON if kind == 'amazon' else GOOGLE, cfg.strict)
        features = ['item', 'category', 'rating']
    return write_prepared(raw, out_dir, name, features, cfg.min_events)


def write_bench_files(raw_dir, n_events, seed):
    """A MovieLens-format ratings.csv/movies.csv shaped like ml-20m (138k users, 27k movies, Zipf popularity, file
    ordered by user then movie), generated vectorised: the input of the scale benchmark."""
    rng = np.random.default_rng(seed)
    n_users, n_items = max(1, n_events // 145), 27_000
    w = rng.exponential(1.0, n_users)
    lengths = 20 + np.floor(w / w.sum() * (n_events - 20 * n_users)).astype(np.int64)
    lengths[: n_events - lengths.sum()] += 1
    user = np.repeat(np.arange(1, n_users + 1), lengths)
    cdf = np.cumsum(np.arange(1, n_items + 1) ** -1.0)
    item = np.searchsorted(cdf, rng.random(n_events) * cdf[-1]) + 1
    order = np.lexsort((item, user))
    rating = rng.integers(1, 11, n_events) / 2
    ts = rng.integers(789652009, 1427784002, n_events)
    Path(raw_dir).mkdir(parents=True, exist_ok=True)
    write_ratings_csv(Path(raw_dir) / 'ratings.csv', user, item[order], rating, ts)
    with open(Path(raw_dir) / 'movies.csv', 'w', newline='') as f:
        wr = csv.writer(f, lineterminator='\n')
        wr.writerow(('movieId', 'title', 'genres'))
        wr.writerows((i, f'Movie {i}, The ({1900 + i % 115})', '|'.join(rng.choice(GENRES, 2, replace=False)))
                     for i in range(1, n_items + 1))


def bench(cfg):
    """Issue sec 7: prepare time and peak memory on a bench_events ratings.csv (in a fresh process, so generating
    the file doesn't count), then batch assembly examples/s at N=50, B=1024."""
    import resource
    import subprocess
    raw, out = Path(cfg.bench_dir) / 'raw', Path(cfg.bench_dir) / 'prepared'
    if not (raw / 'ratings.csv').exists():
        t0 = time.time()
        write_bench_files(raw, cfg.bench_events, cfg.seed)
        print(f"wrote {raw / 'ratings.csv'} ({cfg.bench_events:,} events) in {time.time() - t0:.0f}s")
    t0 = time.time()
    subprocess.run([sys.executable, __file__, '--dataset=ml20m', f'--raw_dir={raw}', f'--out_dir={out}'], check=True)
    secs, peak = time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20  # KiB -> GiB
    d = UserData(out)
    train = d.targets('train')
    print(f"prepare: {d.meta['n_events']:,} events, {d.n_users:,} users in {secs:.1f}s, peak RSS {peak:.2f} GiB; "
          f"{len(train):,} training examples")
    for N in (50, 200):
        batch_targets(train, 0, 1024, 0)  # the epoch permutation is computed once per epoch, not per step
        step, t0 = 0, time.time()
        while time.time() - t0 < 3:
            d.batch(batch_targets(train, step, 1024, 0), N)
            step += 1
        print(f"batch N={N}, B=1024: {step * 1024 / (time.time() - t0):,.0f} examples/s (one core)")


def main(argv):
    from common import configure
    cfg = configure(DEFAULTS, argv, __doc__)
    if cfg.bench:
        return bench(cfg)
    t0 = time.time()
    out = prepare(cfg)
    print(f"prepared {cfg.dataset} in {out} ({time.time() - t0:.1f}s)")


if __name__ == '__main__':
    main(sys.argv[1:])
