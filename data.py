"""
User timelines for User-LLM (paper Sec 4.1, datasets of Table 1): prepare a dataset's raw files
(read by sources.py) into a prepared folder, then leakage-free splits and vectorised batches cut
from it.

    python data.py                                  # the synthetic default -> data/synthetic
    python data.py --dataset=ml1m --download=True   # MovieLens-1M from grouplens.org -> data/ml1m
    python data.py --dataset=ml20m --strict=True    # the first bad row: an error naming its line
    python data.py --dataset=ml20m-shape            # ml-20m's size and shape, generated offline

Datasets: synthetic (the default, generated offline with a known answer), ml20m ml25m
ml-latest-small ml1m ml100k, amazon_movies(_5), google_ny; their raw files, where they come from and
how they are read: see sources.py.

A prepared folder holds numpy files + JSON (no pickle): meta.json, offsets.npy (n_users+1), one
<feature>.npy per feature (events of a user contiguous, sorted by time, stable on ties = file
order), timestamps.npy, item_titles.json, genre_names.json, user_ids.json, item_ids.json and, when
the source has review texts, review_bytes.npy (uint8, utf-8) + review_offsets.npy + review_row.npy;
the synthetic default adds its oracle, oracle_*.npy. Features are ['item', 'genre', 'rating']
(MovieLens, synthetic) or ['item', 'category', 'rating'] (Amazon, Google); id 0 is padding
everywhere.

Documented decisions
- Rating feature: one id per distinct rating value present, ascending (MovieLens half stars ->
  1..10).
- Favourite genre of a history window: the most frequent genre among its real (non-padding) events;
  a tie goes to the tied genre seen most recently. An empty window has favourite 0.
- Splits (Sec 4.1): per user the last event is the test target, the penultimate the validation
  target, every earlier event a training target. `min_history` keeps only targets with at least that
  many events before them (for every split, so min_history=N keeps the paper's users with >= N+1
  events in test).
- Bad input is counted per reason per file and printed as one summary line per file; duplicates are
  identical (user, item, timestamp) events (the first in file order is kept); users with <
  min_events events are dropped. --strict=True stops at the earliest bad line in file order,
  whatever found it (reading or the checks here).
- history_text renders "Title, rating; Title, rating" oldest to newest, ratings as %g (4, 3.5) to
  save tokens.

Dimension letters: B batch (examples), N history length, G genres.
"""
import hashlib
import json
import time
import types
from functools import lru_cache
from pathlib import Path

import numpy as np

from config import UserError, at_least, check, cli, configure, fraction

from sources import (AMAZON, DATASETS, GOOGLE, generate_ml20m_shape, generate_synthetic, raw_file,
                     read_json_source, read_movielens, write_oracle)

DEFAULTS = dict(
    dataset="synthetic", raw_dir="", out_dir="", strict=False, download=False, min_events=3,
    # the synthetic generator (sources.generate_synthetic): planted structure with a known answer,
    # its oracle
    n_users=2000, n_items=500, n_genres=16, min_len=40, max_len=120, p_seq=0.4, p_drift=0.02,
    seed=1337,
    # ml20m-shape: ml-20m's users, rated movies and ratings (sources.generate_ml20m_shape)
    shape_users=138_493, shape_items=26_744, shape_events=20_000_263,
)


RULES = dict(shape_users=at_least(1), shape_items=at_least(1), shape_events=at_least(1),
             n_users=at_least(1), n_items=at_least(3), n_genres=at_least(3), min_len=at_least(3),
             max_len=at_least(3), p_seq=fraction(), p_drift=fraction(), min_events=at_least(3),
             seed=at_least(0))


def config(**overrides):
    """DEFAULTS with overrides, for calling prepare() from Python:
    data.prepare(data.config(n_users=300, ...))."""
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise UserError(f"data.config: unknown key(s) {sorted(unknown)}")
    cfg = types.SimpleNamespace(**{**DEFAULTS, **overrides})
    check(cfg, RULES)
    return cfg


# --------------------------------------------------------------------------------------------------
# prepare: sort, drop duplicates and short users, build vocabularies, write the folder

def _drop(report, reason, lines):
    """Vectorised drops: counted, or in strict mode an error at the first offending line."""
    if len(lines):
        report.drop(reason, int(lines.min()), len(lines))


def by_user_then_time(user, ts):
    """The stable order by (user, time): one argsort of a combined key where it fits an int64 (6x
    faster than np.lexsort on 20M events), else np.lexsort."""
    if not len(user):
        return np.zeros(0, np.int64)
    span = int(ts.max()) - int(ts.min()) + 1
    if (int(user.max()) - int(user.min()) + 1) * span >= 2 ** 62:
        return np.lexsort((ts, user))
    key = user - user.min()  # built in place: one array of the events' size
    key *= span
    key += ts
    key -= ts.min()
    return np.argsort(key, kind="stable")


def order_events(raw, min_events):
    """Event order of the prepared folder: by user, then time, stable on ties (file order);
    identical (user, item, time) events and users with < min_events events dropped and counted.
    Returns (order, lengths)."""
    rep = raw.report
    unknown = raw.item < 0
    if unknown.any():
        _drop(rep, "unknown id", raw.line[unknown])
        known = np.flatnonzero(~unknown)
        order = known[by_user_then_time(raw.user[known], raw.ts[known])]  # ties: file order
    else:  # (no index array over all events: 20M events are 160 MB each)
        order = by_user_then_time(raw.user, raw.ts)
    u, t = raw.user[order], raw.ts[order]
    tie = (u[1:] == u[:-1]) & (t[1:] == t[:-1])  # event k+1 has the same (user, time) as event k
    del t
    if tie.any():  # duplicates can only sit inside a run of tied (user, time): look only there
        cand = np.flatnonzero(np.r_[tie, False] | np.r_[False, tie])
        run = np.cumsum(np.r_[True, ~tie])[cand]  # the run of tied events each candidate is in
        item = raw.item[order[cand]]
        by = np.lexsort((item, run))  # stable: the first in file order first
        cand, run, item = cand[by], run[by], item[by]
        dup = cand[1:][(run[1:] == run[:-1]) & (item[1:] == item[:-1])]
        _drop(rep, "duplicate", raw.line[order[dup]])
        keep = np.ones(len(order), bool)
        keep[dup] = False
        order, u = order[keep], u[keep]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if len(u) else np.zeros(0, np.int64)
    lengths = np.diff(np.r_[starts, len(u)])
    short = np.repeat(lengths < min_events, lengths)
    n_short = int((lengths < min_events).sum())
    _drop(rep, f"short user (< {min_events} events; {n_short:,} users)", raw.line[order[short]])
    rep.close(int((~short).sum()))
    return order[~short], lengths[lengths >= min_events]


def write_prepared(raw, out_dir, name, features, min_events=3, extra_meta=None):
    """RawEvents -> the prepared folder (vocabularies with 0 = padding, flat arrays + offsets).
    Returns its path."""
    order, lengths = order_events(raw, min_events)
    if not len(lengths):
        raise UserError(f"{raw.report.summary()}: no user has {min_events} events or more, "
                        "nothing to prepare")
    starts = np.cumsum(lengths) - lengths  # (users,) first event of each user
    item = raw.item[order]
    present = np.bincount(item, minlength=len(raw.item_ids)) > 0  # the items with a kept event
    item_vocab = np.cumsum(present) * present  # catalogue index -> item id (1..), 0 if absent
    genres = sorted({raw.item_genre[i] for i in np.flatnonzero(present)})
    genre_id = {g: k + 1 for k, g in enumerate(genres)}
    item_genre = np.array([genre_id.get(g, 0) for g in raw.item_genre], np.int64)
    rating = raw.rating[order]
    rating_values = np.unique(rating)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # one column at a time, each in its smallest integer type (20M events: 160 MB each as int64)
    for f, table in ((features[0], item_vocab), (features[1], item_genre)):
        np.save(out / f"{f}.npy", table.astype(_int_dtype(table[present].max(initial=0)))[item])
    del item
    rating_id = np.searchsorted(rating_values, rating).astype(_int_dtype(len(rating_values))) + 1
    np.save(out / "rating.npy", rating_id)
    del rating, rating_id
    np.save(out / "offsets.npy", np.r_[0, np.cumsum(lengths)].astype(np.int64))
    np.save(out / "timestamps.npy", raw.ts[order])
    user_keys = raw.user[order[starts]].tolist()
    _dump(out / "user_ids.json",
          [raw.user_names[k] for k in user_keys] if raw.user_names else user_keys)
    _dump(out / "item_ids.json", [None] + [raw.item_ids[i] for i in np.flatnonzero(present)])
    _dump(out / "item_titles.json",
          ["<pad>"] + [raw.item_titles[i] for i in np.flatnonzero(present)])
    _dump(out / "genre_names.json", ["<pad>"] + genres)
    has_reviews = raw.review_bytes is not None and len(raw.review_bytes) > 0
    if has_reviews:  # texts stay in file-row order; review_row maps each prepared event to its row
        np.save(out / "review_bytes.npy", raw.review_bytes)
        np.save(out / "review_offsets.npy", raw.review_offsets)
        np.save(out / "review_row.npy", order.astype(np.int64))
    reports = raw.other_reports + [raw.report]
    for r in reports:
        print(r.summary())
    vocab_sizes = [int(present.sum()) + 1, len(genres) + 1, len(rating_values) + 1]
    meta = dict(dataset=name, features=features, vocab_sizes=vocab_sizes, n_users=len(lengths),
                n_events=len(order), rating_values=[float(x) for x in rating_values],
                has_reviews=has_reviews, min_events=min_events,
                bad_input=[r.summary() for r in reports], **(extra_meta or {}))
    _dump(out / "meta.json", meta)
    return out


def _int_dtype(vmax):
    return next(dt for dt in (np.int8, np.int16, np.int32, np.int64) if vmax <= np.iinfo(dt).max)


def _dump(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)


def prepare(cfg):
    """Read a dataset's raw files and write its prepared folder; returns the folder's path."""
    name = cfg.dataset
    if name not in ("synthetic", "ml20m-shape") and name not in DATASETS:
        raise UserError(f"unknown dataset '{name}': choose from synthetic, ml20m-shape, "
                        f"{', '.join(DATASETS)}")
    raw_dir, out_dir = cfg.raw_dir or f"data/raw/{name}", cfg.out_dir or f"data/{name}"
    if name == "ml20m-shape":  # ml-20m's size and shape, generated once, read as ml-20m is
        if not (Path(raw_dir) / "ratings.csv").exists():
            generate_ml20m_shape(raw_dir, cfg.shape_users, cfg.shape_items, cfg.shape_events,
                                 cfg.seed)
        raw = read_movielens(raw_dir, "ml20m", cfg.strict)
        return write_prepared(raw, out_dir, name, ["item", "genre", "rating"], cfg.min_events)
    if name == "synthetic":
        keys = ("n_users", "n_items", "n_genres", "min_len", "max_len", "p_seq", "p_drift", "seed")
        params = {k: getattr(cfg, k) for k in keys}
        world, pref, names = generate_synthetic(raw_dir, **params)
        raw = read_movielens(raw_dir, name, cfg.strict)
        out = write_prepared(raw, out_dir, name, ["item", "genre", "rating"], cfg.min_events,
                             dict(synthetic=dict(params, genre_names=names)))
        write_oracle(out, world, pref)
        return out
    kind, files = DATASETS[name]
    if kind == "movielens":
        raw = read_movielens(raw_dir, name, cfg.strict, cfg.download)
        features = ["item", "genre", "rating"]
    else:
        (rev, rev_url), (meta, meta_url) = files.items()
        paths = (raw_file(raw_dir, rev, rev_url, cfg.download),
                 raw_file(raw_dir, meta, meta_url, cfg.download))
        raw = read_json_source(*paths, AMAZON if kind == "amazon" else GOOGLE, cfg.strict)
        features = ["item", "category", "rating"]
    return write_prepared(raw, out_dir, name, features, cfg.min_events)


# --------------------------------------------------------------------------------------------------
# the prepared dataset: splits and examples (paper Sec 4.1)

class UserData:
    """A prepared folder in memory. Examples are cut on the fly from offsets, never materialised."""

    def __init__(self, path):
        self.path = Path(path)
        if not (self.path / "meta.json").exists():
            raise UserError(f"no prepared dataset at {self.path}: run `python data.py "
                            "--dataset=NAME` first")
        load = lambda name, mmap=None: np.load(self.path / name, allow_pickle=False, mmap_mode=mmap)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.features = self.meta["features"]
        self.vocab_sizes = tuple(self.meta["vocab_sizes"])
        self.offsets = load("offsets.npy")
        self.n_users = len(self.offsets) - 1
        self.feats = tuple(load(f"{f}.npy") for f in self.features)
        self._fingerprint = None  # see fingerprint()
        self.timestamps = load("timestamps.npy", "r")
        self.item_titles, self.genre_names, self.user_ids, self.item_ids = (
            json.loads((self.path / f).read_text(encoding="utf-8"))
            for f in ("item_titles.json", "genre_names.json", "user_ids.json", "item_ids.json"))
        self.rating_values = [0.0] + self.meta["rating_values"]  # rating id -> value
        if self.meta["has_reviews"]:
            files = ("review_bytes.npy", "review_offsets.npy", "review_row.npy")
            self._reviews = [load(f, "r") for f in files]

    def fingerprint(self):
        """What identifies this prepared dataset: stored in every checkpoint, compared
        (common.check_data) whenever a checkpoint is used with data, so that a model is never scored
        on, or continued with, data it was not made for: the events, and the text an LLM reads and
        writes (titles, genre names, ratings, reviews). Hashed once per UserData."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            reviews = self._reviews if self.meta["has_reviews"] else ()
            for a in (self.offsets, *self.feats, *reviews):
                h.update(np.ascontiguousarray(a))  # the array's bytes, without a copy
            for name in ("item_titles.json", "genre_names.json"):
                h.update((self.path / name).read_bytes())
            h.update(json.dumps(self.rating_values).encode())
            self._fingerprint = dict(dataset=self.meta["dataset"], path=str(self.path.resolve()),
                                     vocab_sizes=list(self.vocab_sizes), n_users=int(self.n_users),
                                     n_events=int(self.offsets[-1]), sha256=h.hexdigest()[:16])
        return dict(self._fingerprint)

    def user_of(self, events):
        """User index of flat event indices."""
        return np.searchsorted(self.offsets, events, side="right") - 1

    def targets(self, split, min_history=1):
        """Flat event indices of the targets of a split: 'test' = each user's last event, 'val' =
        the penultimate, 'train' = every earlier event. Only targets with >= min_history events
        before them are kept."""
        starts, lengths = self.offsets[:-1], np.diff(self.offsets)
        if split == "train":
            pos = np.arange(self.offsets[-1]) - np.repeat(starts, lengths)  # within its user
            return np.flatnonzero((pos >= min_history) & (pos <= np.repeat(lengths - 3, lengths)))
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', not {split!r}")
        t = self.offsets[1:] - (2 if split == "val" else 1)
        return t[t - starts >= min_history].astype(np.int64)

    def windows(self, targets, N):
        """(B, N) flat indices of the up-to-N events before each target (oldest first) and (B, N)
        bool real mask; left padding has index 0 and mask False."""
        t = np.asarray(targets, np.int64)
        start = self.offsets[self.user_of(t)]
        idx = t[:, None] + np.arange(-N, 0)  # (B, N)
        real = idx >= start[:, None]  # (B, N) never reaches into the previous user
        return np.where(real, idx, 0), real

    def batch(self, targets, N):
        """Model inputs for targets: hist (per feature (B, N), left-padded with 0), target (per
        feature (B,)) and fav (B,) the favourite genre/category of the window. All int64 numpy
        arrays (common.to_device makes them tensors on a device)."""
        t = np.asarray(targets, np.int64)
        idx, real = self.windows(t, N)
        hist = [np.where(real, f[idx], 0).astype(np.int64) for f in self.feats]  # each (B, N)
        return dict(hist=tuple(hist), target=tuple(f[t].astype(np.int64) for f in self.feats),
                    fav=favourite(hist[1]).astype(np.int64))

    def history_text(self, target, k):
        """'Title, rating; Title, rating; ...' of the last k events before target, oldest to newest
        (TextPrompt)."""
        t = int(target)
        lo = max(int(self.offsets[self.user_of(t)]), t - k)
        item, rating = self.feats[0], self.feats[2]
        return "; ".join(f"{self.item_titles[item[j]]}, {self.rating_values[rating[j]]:g}"
                         for j in range(lo, t))

    def review(self, target):
        """The user's review text of the target event ('' when the dataset has none)."""
        if not self.meta["has_reviews"]:
            return ""
        buf, off, row = self._reviews
        r = int(row[int(target)])
        return bytes(buf[off[r]:off[r + 1]]).decode("utf-8", "replace")


def popularity(d, feature=0):
    """Counts of each id of a feature over the training events only (each user's last two events are
    val/test): the most-popular baseline's scores, -inf for padding, which is never a candidate."""
    keep = np.ones(len(d.feats[feature]), dtype=bool)
    ends = d.offsets[1:]
    keep[ends - 1] = keep[ends - 2] = False
    ids = np.asarray(d.feats[feature])[keep]
    counts = np.bincount(ids, minlength=d.vocab_sizes[feature]).astype(np.float32)
    counts[0] = -np.inf
    return counts


def favourite(genres):
    """(B, N) genre ids (0 = padding) -> (B,) the most frequent genre of each row; a tie goes to the
    tied genre seen most recently (rightmost). An all-padding row gives 0. Vectorised with one
    bincount over (row, genre) keys."""
    B, N = genres.shape
    G, rows = int(genres.max(initial=0)) + 1, np.arange(B)
    count = np.bincount((rows[:, None] * G + genres).ravel(), minlength=B * G).reshape(B, G)
    count[:, 0] = 0  # padding never wins
    # (B, N): the position holds a top genre
    best = (count[rows[:, None], genres] == count.max(1, keepdims=True)) & (genres > 0)
    last = N - 1 - best[:, ::-1].argmax(1)  # (B,) the rightmost such position
    return np.where(best.any(1), genres[rows, last], 0)


@lru_cache(maxsize=2)
def _epoch_permutation(seed, epoch, n):
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_targets(targets, step, batch_size, seed):
    """The global batch of a training step: positions step*B .. step*B+B-1 of an endless stream of
    epochs, each epoch a permutation seeded by (seed, epoch). A function of (seed, step) only, so
    training resumes from the step and every world size sees the same global batch (each rank takes
    a slice)."""
    n = len(targets)
    pos = step * batch_size + np.arange(batch_size)
    epoch, within = pos // n, pos % n
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epoch):
        m = epoch == e
        out[m] = targets[_epoch_permutation(seed, int(e), n)[within[m]]]
    return out


def length_grouped(targets, group_index, batch_size, seed, group, prompt_lengths):
    """Ours (docs/deviations.md): the global batches of steps group_index*group .. +group-1, pooled,
    sorted by prompt length and cut into `group` batches again, in a seeded order. Each example
    still trains once in those steps, and a batch pads to its own longest prompt, not the pool's:
    TextPrompt's histories cost about their tokens. prompt_lengths: target indices -> lengths."""
    first = group_index * group
    pool = np.concatenate([batch_targets(targets, first + j, batch_size, seed)
                           for j in range(group)])
    pool = pool[np.argsort(prompt_lengths(pool), kind="stable")]
    order = np.random.default_rng([seed, group_index, 1]).permutation(group)
    return [pool[j * batch_size:(j + 1) * batch_size] for j in order]


def train_batches(targets, batch_size, seed, length_groups=0, prompt_lengths=None):
    """step -> the global batch of a training step, a function of (seed, step): batch_targets',
    or (length_groups > 0) length_grouped's, each group computed once."""
    if not length_groups:
        return lambda step: batch_targets(targets, step, batch_size, seed)
    group = lru_cache(maxsize=1)(lambda g: length_grouped(targets, g, batch_size, seed,
                                                          length_groups, prompt_lengths))
    return lambda step: group(step // length_groups)[step % length_groups]


# --------------------------------------------------------------------------------------------------
# tasks as text (Sec 4.2-4.5): the LLM's prompts and answers, token ids as numpy arrays

# the task prompts: short and fixed, so that the user context costs no extra text tokens
QUERY = {
    "next_item": "The user's next item:",
    "fav": "The user's favourite {feature}:",
    "review_gen": "The user's review of {title}, rated {rating}:",
}


def get_tokenizer(llm):
    """GPT-2's BPE (tiktoken r50k_base, the same as 'gpt2') for GPT-2 models; a byte-level encoding
    (256 byte tokens +
    <|endoftext|>) for the from-scratch GPT, which needs no vocabulary file and so works offline."""
    import tiktoken  # only the LLM side needs it
    if llm == "scratch":
        return tiktoken.Encoding(name="bytes", pat_str=r"[\s\S]",
                                 mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={"<|endoftext|>": 256})
    try:
        return tiktoken.get_encoding("r50k_base")
    except Exception as e:
        why = f"{e}".splitlines()[0] if f"{e}" else type(e).__name__
        raise UserError(f"cannot load the GPT-2 tokenizer (tiktoken r50k_base): {why}; offline, "
                        "set TIKTOKEN_CACHE_DIR to a folder holding r50k_base's file")


def unique_names(names):
    """Catalogue names made unique (an answer must name one item): a repeated title gets its id,
    "Heat [412]"."""
    counts = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return [n if counts[n] == 1 else f"{n} [{i}]" for i, n in enumerate(names)]


class Prompter:
    """Turns examples into token sequences [prompt][answer][eot] with targets on the answer (and
    eot) only. The prompt is the task's short query, after the last text_events events written out
    (TextPrompt, UserData.history_text). pack > 0 (pretraining an LLM without user context): each
    row is the batch's `pack` previous examples, then its own, one after another as GPT-2's
    pretraining documents are, with targets on every answer; so the LLM learns to read a query
    wherever it stands and whatever precedes it (a soft prompt, a written history). mixed > 0
    (pretraining too): each example writes out between 0 and `mixed` of its user's last events (the
    number: its target index mod (mixed + 1), so a function of the example), so the LLM reads
    histories written as text, and a query after one or after none (TextPrompt, soft prompt)."""

    def __init__(self, d, tok, task, text_events, max_text_tokens, max_answer_tokens, pack=0,
                 mixed=0):
        if task not in QUERY:
            raise UserError(f"config: task must be one of {', '.join(QUERY)}, got '{task}'")
        self.d, self.tok, self.task, self.k = d, tok, task, text_events
        self.max_text_tokens = max_text_tokens
        self.pack, self.mixed = pack, mixed
        self.max_answer, self.eot = max_answer_tokens, tok.eot_token
        self.names = unique_names(d.genre_names if task == "fav" else d.item_titles)  # id -> answer
        # the catalogue's answers, tokenized once (not in the batch hot path): " name" + eot
        answers = tok.encode_ordinary_batch([" " + n for n in self.names])
        self.answers = [a + [self.eot] for a in answers]

    def prompts(self, targets):
        """The prompt tokens of examples given by their target's flat event index."""
        texts = []
        for t in targets:
            title = self.d.item_titles[self.d.feats[0][t]]
            rating = self.d.rating_values[self.d.feats[2][t]]
            k = int(t) % (self.mixed + 1) if self.mixed else self.k
            history = f"History: {self.d.history_text(t, k)}\n" if k else ""
            query = QUERY[self.task].format(feature=self.d.features[1], title=title,
                                            rating=f"{rating:g}")
            texts.append(history + query)
        return self.tok.encode_ordinary_batch(texts)

    def prompt_lengths(self, targets):
        """The prompts' lengths in tokens (data.length_grouped sorts by them)."""
        return [len(p) for p in self.prompts(targets)]

    def answer_tokens(self, targets, d_batch):
        """The answers: the target item's title, the favourite genre/category's name, or the user's
        review."""
        if self.task == "review_gen":
            reviews = self.tok.encode_ordinary_batch([" " + self.d.review(t) for t in targets])
            return [r[:self.max_answer] + [self.eot] for r in reviews]
        ids = d_batch["fav"] if self.task == "fav" else d_batch["target"][0]
        return [self.answers[i] for i in ids.tolist()]

    def __call__(self, d_batch, targets):
        """Add idx (B, T) and targets (B, T) -- -1 except on the answer tokens, right-padded -- to a
        data batch."""
        P, A = self.prompts(targets), self.answer_tokens(targets, d_batch)
        # (tokens, is-answer) of each example
        docs = [(np.array(p + a), np.arange(len(p) + len(a)) >= len(p)) for p, a in zip(P, A)]
        rows = []
        for r in range(len(docs)):  # row r: examples r - pack, ..., r - 1, r (wrapping around)
            row = [docs[(r - j) % len(docs)] for j in range(self.pack, -1, -1)]
            rows.append((np.concatenate([s for s, _ in row]), np.concatenate([m for _, m in row])))
        T = max(len(s) for s, _ in rows) - 1
        if T > self.max_text_tokens:
            raise UserError(f"a prompt + answer of {T} tokens exceeds max_text_tokens="
                            f"{self.max_text_tokens}: raise it or lower text_events / "
                            "max_answer_tokens / pack_examples / mixed_history")
        idx = np.full((len(rows), T), self.eot, dtype=np.int64)
        tgt = np.full((len(rows), T), -1, dtype=np.int64)
        for r, (seq, is_answer) in enumerate(rows):
            idx[r, :len(seq) - 1] = seq[:-1]
            tgt[r, :len(seq) - 1] = np.where(is_answer[1:], seq[1:], -1)  # t predicts token t + 1
        d_batch["idx"], d_batch["targets"] = idx, tgt
        return d_batch


def by_prompt_length(prompts, batch_size):
    """Batches of example positions whose prompts have equal length (one tensor each)."""
    groups = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    for members in groups.values():
        for j in range(0, len(members), batch_size):
            yield members[j:j + batch_size]


def main(argv):
    cfg = configure(DEFAULTS, argv, __doc__, RULES)
    t0 = time.time()
    out = prepare(cfg)
    print(f"prepared {cfg.dataset} in {out} ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    cli(main)
