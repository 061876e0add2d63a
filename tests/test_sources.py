"""sources.py: the publishers' formats read on small files written here (MovieLens 20M/1M/100K,
Amazon, Google Local), bad input counted or, in strict mode, named by file and line; downloads
(file:// URLs) and broken archives; the synthetic generator and its oracle."""
import gzip
import json
import zipfile
import zlib

import numpy as np
import pytest

import sources
from config import UserError
from conftest import prep


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(content)
    else:
        path.write_bytes(content)


ML20M_RATINGS = b"""userId,movieId,rating,timestamp
1,1,4.0,1000
1,4,2.0,1001
1,2,3.5,1002
1,3,5.0,1001
1,2,3.5,1002
2,1,4.0,5
2,99,3.0,6
2,2,,7
this line is garbage
2,5,4.0,8
2,3,4.0,9
3,1,4.5,10
3,2,4.5,11
4,1,1.0,1
4,3,0.5,2
4,5,3.0,3
"""


ML20M_MOVIES = (b"movieId,title,genres\n"
                b"1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
                b'2,"American President, The (1995)",Comedy|Drama|Romance\n'
                b"3,Heat (1995),Action|Crime|Thriller\n"
                b'4,Nobody\'s Film (2015),(no genres listed)\n'
                b'5,"Caf\xe9, Le (2001)",Comedy|Romance\n'  # a latin-1 byte in a utf-8 file
                b"6,Unrated (2000),Drama\n")


def test_movielens_csv_reader(tmp_path, capsys):
    write(tmp_path / "raw" / "ratings.csv", ML20M_RATINGS)
    write(tmp_path / "raw" / "movies.csv", ML20M_MOVIES)
    d = prep(tmp_path, "ml20m")
    out = capsys.readouterr().out
    assert "movies.csv: kept 6, dropped 0; repaired invalid utf-8: 1" in out
    assert ("ratings.csv: kept 10, dropped 6 (duplicate: 1, malformed line: 1, missing field: 1, "
            "short user (< 3 events; 1 users): 2, unknown id: 1)") in out
    assert d.features == ["item", "genre", "rating"] and d.n_users == 3 and d.user_ids == [1, 2, 4]
    # 5 rated movies, 5 genres used, 7 distinct ratings, + padding
    assert d.vocab_sizes == (6, 6, 8)
    assert d.item_titles[d.item_ids.index(2)] == "American President, The (1995)"
    assert d.item_titles[d.item_ids.index(5)] == "Caf\ufffd, Le (2001)"
    genre = {d.item_ids[i]: d.genre_names[g] for i, g in zip(d.feats[0], d.feats[1])}
    # least frequent genre across the catalogue, ties to the first listed; "(no genres listed)" is a
    # genre
    assert genre == {1: "Adventure", 2: "Drama", 3: "Action", 4: "(no genres listed)", 5: "Romance"}
    u1 = slice(d.offsets[0], d.offsets[1])
    # by time; the tie at 1001 keeps file order
    assert [d.item_ids[i] for i in d.feats[0][u1]] == [1, 4, 3, 2]
    assert list(d.timestamps[u1]) == [1000, 1001, 1001, 1002]
    assert [d.rating_values[r] for r in d.feats[2][u1]] == [4.0, 2.0, 5.0, 3.5]
    assert d.review(0) == "" and d.history_text(3, 2) == 'Nobody\'s Film (2015), 2; Heat (1995), 5'


def test_ml1m_reader_latin1(tmp_path, capsys):
    write(tmp_path / "raw" / "ratings.dat",
          b"1::1::5::978300760\n1::2::3::978302109\n1::2::3\n1::1::4::978301968\n")
    write(tmp_path / "raw" / "movies.dat",
          "1::Misérables, Les (1995)::Drama|Musical\n2::Babe (1995)::Children's|"
          "Comedy|Drama\n".encode("latin-1"))
    d = prep(tmp_path, "ml1m")
    assert "ratings.dat: kept 3, dropped 1 (malformed line: 1)" in capsys.readouterr().out
    assert d.item_titles[1:] == ["Misérables, Les (1995)", "Babe (1995)"]
    # by time; rarest genre
    assert [d.genre_names[g] for g in d.feats[1]] == ["Musical", "Musical", "Children's"]


@pytest.mark.parametrize("name,sep", [("ml1m", "::"), ("ml100k", "\t"), ("ml20m", ",")])
def test_impossible_values_are_dropped_and_counted(tmp_path, capsys, name, sep):
    """A time no int64 holds (1e30), a negative time, a rating outside 0.5..5 or off the half stars,
    a negative id: each row dropped and counted by reason, never turned into a value."""
    rows = [("1", "1", "4", "978300760"), ("1", "2", "3", "1e30"), ("1", "1", "99", "978300761"),
            ("1", "2", "3.7", "978300762"), ("1", "2", "3", "-5"), ("-1", "2", "3", "978300763"),
            ("1", "2", "5", "978300764"), ("1", "1", "2", "978300765")]
    text = "".join(sep.join(r) + "\n" for r in rows)
    flags = "|".join("0" for _ in range(19))
    if name == "ml1m":
        files = {"ratings.dat": text, "movies.dat": "1::A (1995)::Drama\n2::B (1996)::Comedy\n"}
    elif name == "ml100k":
        files = {"u.data": text, "u.item": f"1|A (1995)|||x|{flags}\n2|B (1996)|||x|{flags}\n"}
    else:
        files = {"ratings.csv": "userId,movieId,rating,timestamp\n" + text,
                 "movies.csv": "movieId,title,genres\n1,A (1995),Drama\n2,B (1996),Comedy\n"}
    for f, content in files.items():
        write(tmp_path / "raw" / f, content.encode("latin-1"))
    d = prep(tmp_path, name)
    out = capsys.readouterr().out
    assert ("kept 3, dropped 5 (id out of range: 1, rating out of range: 2, time out of range: 2)"
            in out), out
    assert d.meta["rating_values"] == [2.0, 4.0, 5.0] and np.asarray(d.timestamps).min() >= 0
    line = 3 if name == "ml20m" else 2  # the 1e30 row; ratings.csv has a header
    with pytest.raises(UserError, match=rf":{line}: time out of range \(strict mode\)"):
        prep(tmp_path, name, strict=True)


def test_ml100k_reader(tmp_path):
    flags = lambda *on: "|".join("1" if k in on else "0" for k in range(19))
    write(tmp_path / "raw" / "u.data",
          b"196\t242\t3\t881250949\n196\t1\t4\t881250950\n196\t242\t5\t881250951\n")
    write(tmp_path / "raw" / "u.item", (
          f"1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy|{flags(3, 4, 5)}\n"
          f"242|Kolya (1996)|24-Jan-1997||http://us.imdb.com/M/title-exact?Kolya|{flags(5)}\n"
          f"243|Café (1997)|01-Jan-1997||http://x|{flags()}\n").encode("latin-1"))
    d = prep(tmp_path, "ml100k")
    assert d.item_titles == ["<pad>", "Toy Story (1995)", "Kolya (1996)"]
    # Comedy is on both items, so Toy Story's most specific genre is its first rarest: Animation
    assert d.genre_names == ["<pad>", "Animation", "Comedy"]
    assert list(d.feats[1]) == [2, 1, 2] and d.vocab_sizes == (3, 3, 4)


def _jsonl(rows):
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def test_amazon_reader(tmp_path, capsys):
    rev = lambda u, i, y, t, **kw: dict(reviewerID=u, asin=i, overall=y, unixReviewTime=t, **kw)
    write(tmp_path / "raw" / "Movies_and_TV_5.json.gz", _jsonl([
        rev("A1", "a1", 5.0, 100, reviewText="Great", summary="s"),
        rev("A1", "a2", 4.0, 200, summary="Nice"), rev("A1", "a3", 3.0, 300, reviewText="ok"),
        rev("A2", "a1", 1.0, 50, reviewText="bad"), b'{"reviewerID": "A3", ',
        dict(reviewerID="A3", asin="a1", unixReviewTime=10),
        rev("A2", "a2", 2.0, 60, reviewText="meh"), rev("A2", "a1", 5.0, 70, reviewText=None)]))
    write(tmp_path / "raw" / "meta_Movies_and_TV.json.gz", _jsonl([
        dict(asin="a1", title='<span class="x">Star Wars &amp; More</span>',
             category=["Movies & TV", "Genre for Featured Categories", "Science Fiction"]),
        dict(asin="a2", title="", category=["Movies & TV"]), dict(asin="a1", title="dup"),
        dict(asin="a4", title="Unused", category=None)]))
    d = prep(tmp_path, "amazon_movies_5")
    out = capsys.readouterr().out
    assert "meta_Movies_and_TV.json.gz: kept 3, dropped 1 (duplicate: 1)" in out
    assert ("Movies_and_TV_5.json.gz: kept 6, dropped 2 (malformed line: 1, missing field: 1); "
            "repaired item without metadata (fallback title): 1") in out
    assert d.features == ["item", "category", "rating"] and d.user_ids == ["A1", "A2"]
    assert d.item_titles == ["<pad>", "Star Wars & More", "Item a2", "Item a3"]
    assert d.genre_names == ["<pad>", "(no category)", "Movies & TV", "Science Fiction"]
    # summary, else reviewText
    assert [d.review(t) for t in range(6)] == ["s", "Nice", "ok", "bad", "meh", ""]
    assert d.history_text(2, 5) == "Star Wars & More, 5; Item a2, 4"


def test_google_reader_plain_and_null_fields(tmp_path, capsys):
    rev = lambda u, g, y, t, text: dict(user_id=u, name="x", time=t, rating=y, text=text, pics=None,
                                        resp=None, gmap_id=g)
    write(tmp_path / "raw" / "review-New_York.json.gz", _jsonl([
        rev("101", "0x1", 5, 1_600_000_000_000, None),
        rev("101", "0x2", 4, 1_600_000_100_000, "Good"),
        json.dumps(rev("101", "0x1", 3, 1_600_000_200_000, "Caf#")).encode().replace(b"#", b"\xe9"),
        rev("102", "0x1", 1, 1_600_000_000_000, "no")]))
    # shipped gzipped; an un-gzipped copy works too
    write(tmp_path / "raw" / "meta-New_York.json", _jsonl([
        dict(name="Joe's Pizza", gmap_id="0x1",
             category=["Pizza restaurant", "Italian restaurant"]),
        dict(name="Park", gmap_id="0x2", category=None)]))
    d = prep(tmp_path, "google_ny")
    out = capsys.readouterr().out
    assert ("review-New_York.json.gz: kept 3, dropped 1 (short user (< 3 events; 1 users): 1); "
            "repaired invalid utf-8: 1") in out
    assert d.user_ids == ["101"] and d.item_titles == ["<pad>", "Joe's Pizza", "Park"]
    assert d.genre_names == ["<pad>", "(no category)", "Pizza restaurant"]
    assert list(d.timestamps) == [1_600_000_000, 1_600_000_100, 1_600_000_200]  # ms -> s
    assert [d.review(t) for t in range(3)] == ["", "Good", "Caf\ufffd"]


def test_strict_mode_names_file_and_line(tmp_path):
    write(tmp_path / "raw" / "ratings.csv", ML20M_RATINGS)
    write(tmp_path / "raw" / "movies.csv", ML20M_MOVIES.replace(b"\xe9", b"e"))
    # the duplicate on line 6 (found after reading) comes before the unknown id (8) and the missing
    # field (9)
    with pytest.raises(UserError, match=r"ratings\.csv:6: duplicate \(strict mode\)"):
        prep(tmp_path, "ml20m", strict=True)


def test_missing_raw_file_names_path_and_url(tmp_path):
    with pytest.raises(UserError) as e:
        prep(tmp_path, "amazon_movies")
    msg = str(e.value)
    assert (str(tmp_path / "raw" / "Movies_and_TV.json.gz") in msg
            and sources.DATASETS["amazon_movies"][1]["Movies_and_TV.json.gz"] in msg
            and "\n" not in msg)


def test_download_file_url_and_zip(tmp_path):
    src = tmp_path / "src"
    write(src / "ml-1m" / "ratings.dat", b"1::1::5::3\n1::2::3::2\n1::1::4::1\n")
    write(src / "ml-1m" / "movies.dat", b"1::A (1990)::Drama\n2::B (1991)::Comedy\n")
    with zipfile.ZipFile(tmp_path / "ml-1m.zip", "w") as z:
        for f in ("ratings.dat", "movies.dat"):
            z.write(src / "ml-1m" / f, f"ml-1m/{f}")
    got = sources.download((tmp_path / "ml-1m.zip").as_uri(), tmp_path / "dl" / "copy.zip")
    assert got.read_bytes() == (tmp_path / "ml-1m.zip").read_bytes()
    assert not (tmp_path / "dl" / "copy.zip.part").exists()
    url = (tmp_path / "ml-1m.zip").as_uri()
    # downloads and flattens the zip's folder
    p = sources.raw_file(tmp_path / "raw", "ratings.dat", url, fetch=True)
    assert (p.read_bytes() == (src / "ml-1m" / "ratings.dat").read_bytes()
            and (tmp_path / "raw" / "movies.dat").exists())
    with pytest.raises(UserError,
                       match=r"could not download nothing\.gz from "
                             r"http://127\.0\.0\.1:9/nothing\.gz .*put it at"):
        sources.download("http://127.0.0.1:9/nothing.gz", tmp_path / "nothing.gz", timeout=2)


def test_read_numeric_chunks_and_slow_path(tmp_path):
    rng = np.random.default_rng(0)
    n = 500
    u, i, t = (rng.integers(1, 10 ** 6, n), rng.integers(1, 200_000, n),
               rng.integers(0, 2 * 10 ** 9, n))
    r = rng.integers(1, 11, n) / 2
    sources.write_ratings_csv(tmp_path / "r.csv", u, i, r, t)
    lines = (tmp_path / "r.csv").read_bytes().split(b"\n")
    assert lines[1] == f"{u[0]},{i[0]},{r[0]:.1f},{t[0]}".encode()
    lines[300] = b"1,2,3"  # one malformed line in one chunk
    (tmp_path / "r.csv").write_bytes(b"\n".join(lines))
    for chunk in (1 << 20, 97):  # one chunk / many chunks cut mid-line
        rep = sources.Report(tmp_path / "r.csv")
        (cu, ci, cr, ct), ln = sources.read_numeric(tmp_path / "r.csv", b",",
                                                    (np.int64, np.int64, np.float32, np.int64),
                                                    [0, 1, 3], rep, header=True, chunk_bytes=chunk)
        keep = np.arange(n) != 299
        assert rep.dropped == {"malformed line": 1} and list(ln[298:300]) == [300, 302]
        assert ((cu == u[keep]).all() and (ci == i[keep]).all() and (cr == r[keep]).all()
                and (ct == t[keep]).all())


AMAZON_META = [dict(asin=a, title=f"Title {a}", category=["Movies & TV", "Drama"])
               for a in ("a1", "a2", "a3")]


def _amazon_rev(u, i, y, t, **kw):
    return dict(reviewerID=u, asin=i, overall=y, unixReviewTime=t, **kw)


def _gzip_cut(rows, frac=0.5):
    """Gzipped JSON lines cut at frac of their bytes, and how many whole lines the cut file still
    holds."""
    gz = gzip.compress(_jsonl(rows))
    cut = gz[:int(len(gz) * frac)]
    return cut, zlib.decompressobj(31).decompress(cut).count(b"\n")


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("which", ["Movies_and_TV_5.json.gz", "meta_Movies_and_TV.json.gz"])
def test_truncated_gzip_is_one_line_error(tmp_path, strict, which):
    reviews = [_amazon_rev(f"A{k % 50}", f"a{k % 3 + 1}", 4.0, k, summary=f"summary {k}")
               for k in range(3000)]
    meta = AMAZON_META + [dict(asin=f"x{k}", title=f"Other {k}", category=["Movies & TV"])
                          for k in range(3000)]
    rows = reviews if which.startswith("Movies") else meta
    cut, whole = _gzip_cut(rows)
    write(tmp_path / "raw" / "Movies_and_TV_5.json.gz", _jsonl(reviews))
    write(tmp_path / "raw" / "meta_Movies_and_TV.json.gz", _jsonl(meta))
    (tmp_path / "raw" / which).write_bytes(cut)
    with pytest.raises(UserError) as e:
        prep(tmp_path, "amazon_movies_5", strict=strict)
    msg = str(e.value)
    assert msg == (f"{tmp_path / 'raw' / which}: the gzip file ends early (truncated?) after line "
                   f"{whole:,}; re-download it") and 0 < whole < len(rows)


def test_corrupt_gzip_is_one_line_error(tmp_path):
    reviews = [_amazon_rev("A1", f"a{k}", 4.0, k, summary="s") for k in (1, 2, 3)]
    gz = bytearray(gzip.compress(_jsonl(reviews)))
    gz[-8] ^= 0xff  # the stored CRC of the data
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "Movies_and_TV_5.json.gz").write_bytes(bytes(gz))
    write(tmp_path / "raw" / "meta_Movies_and_TV.json.gz", _jsonl(AMAZON_META))
    with pytest.raises(UserError, match=r"Movies_and_TV_5\.json\.gz: the gzip file is corrupt "
                                        r"after line 3 \(CRC check failed .*\); re-download it$"):
        prep(tmp_path, "amazon_movies_5")


@pytest.mark.parametrize("damage", ["truncated", "corrupt member"])
def test_bad_zip_download_is_one_line_error(tmp_path, damage):
    rng = np.random.default_rng(0)
    ratings = b"".join(b"%d::%d::%d::%d\n" % tuple(x) for x in rng.integers(1, 10 ** 6, (3000, 4)))
    with zipfile.ZipFile(tmp_path / "ml-1m.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("ml-1m/ratings.dat", ratings)
        z.writestr("ml-1m/movies.dat", b"1::A (1990)::Drama\n")
        info = z.getinfo("ml-1m/ratings.dat")
    b = bytearray((tmp_path / "ml-1m.zip").read_bytes())
    if damage == "truncated":
        b = b[:len(b) // 2]
    else:  # garble the middle of ratings.dat's compressed bytes; the zip's directory stays intact
        mid = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
        b[mid:mid + 64] = bytes(64)
    (tmp_path / "ml-1m.zip").write_bytes(bytes(b))
    with pytest.raises(UserError) as e:
        sources.raw_file(tmp_path / "raw", "ratings.dat", (tmp_path / "ml-1m.zip").as_uri(),
                         fetch=True)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'raw' / 'ml-1m.zip'}: the zip file is truncated or "
                          "corrupt (")
    assert "\n" not in msg
    assert (not (tmp_path / "raw" / "ratings.dat").exists()
            and not list((tmp_path / "raw").glob("*.part")))


def test_strict_mode_reports_earliest_line_in_file_order(tmp_path):
    write(tmp_path / "raw" / "Movies_and_TV_5.json.gz", _jsonl([
        _amazon_rev("A1", "a1", 5.0, 100), _amazon_rev("A1", "a2", 4.0, 200),
        # line 3: a duplicate of line 2, found only after reading
        _amazon_rev("A1", "a2", 4.0, 200),
        _amazon_rev("A1", "a3", 3.0, 300), b'{"reviewerID": "A1", ',
        _amazon_rev("A1", "a1", 2.0, 400)]))
    write(tmp_path / "raw" / "meta_Movies_and_TV.json.gz", _jsonl(AMAZON_META))
    with pytest.raises(UserError, match=r"Movies_and_TV_5\.json\.gz:3: duplicate \(strict mode\)$"):
        prep(tmp_path, "amazon_movies_5", strict=True)
    d = prep(tmp_path, "amazon_movies_5")  # not strict: both counted
    assert d.meta["bad_input"][-1] == ("Movies_and_TV_5.json.gz: kept 4, dropped 2 "
                                       "(duplicate: 1, malformed line: 1)")


@pytest.mark.parametrize("strict", [False, True])
def test_blank_json_lines_are_skipped(tmp_path, strict):
    write(tmp_path / "raw" / "Movies_and_TV_5.json.gz", _jsonl([
        _amazon_rev("A1", "a1", 5.0, 100), b"", _amazon_rev("A1", "a2", 4.0, 200), b"   \t",
        b"\r", _amazon_rev("A1", "a3", 3.0, 300), b""]))
    write(tmp_path / "raw" / "meta_Movies_and_TV.json.gz",
          _jsonl([AMAZON_META[0], b" ", *AMAZON_META[1:]]))
    d = prep(tmp_path, "amazon_movies_5", strict=strict)
    assert d.meta["bad_input"] == ["meta_Movies_and_TV.json.gz: kept 3, dropped 0",
                                   "Movies_and_TV_5.json.gz: kept 3, dropped 0"]


def test_amazon_review_target_is_summary(tmp_path):
    long = "I bought this for my dad and he watched it twice; the picture quality is fine."
    write(tmp_path / "raw" / "Movies_and_TV_5.json.gz", _jsonl([
        _amazon_rev("A1", "a1", 4.0, 100, summary="Four Stars.", reviewText=long),
        _amazon_rev("A1", "a2", 5.0, 200, summary="", reviewText="only the long text"),
        _amazon_rev("A1", "a3", 1.0, 300, summary="  ", reviewText="blank summary"),
        _amazon_rev("A1", "a1", 2.0, 400, summary=None)]))
    write(tmp_path / "raw" / "meta_Movies_and_TV.json.gz", _jsonl(AMAZON_META))
    d = prep(tmp_path, "amazon_movies_5")
    assert [d.review(t) for t in range(4)] == ["Four Stars.", "only the long text",
                                               "blank summary", ""]


def test_corrupt_values_are_counted_not_tracebacks(tmp_path):
    write(tmp_path / "a" / "raw" / "Movies_and_TV_5.json.gz", _jsonl([
        *(_amazon_rev("A1", f"a{k}", 4.0, 100 * k) for k in (1, 2, 3)),
        b'{"reviewerID": "A2", "asin": "a1", "overall": 5.0, "unixReviewTime": 1e999}',  # int(inf)
        _amazon_rev("A2", "a1", 5.0, 10 ** 30),  # no int64 holds it
        b'{"reviewerID": "A2", "asin": "a1", "overall": NaN, "unixReviewTime": 5}',
        b"[" * 100_000]))  # nested deeper than the JSON parser recurses
    write(tmp_path / "a" / "raw" / "meta_Movies_and_TV.json.gz",
          _jsonl([*AMAZON_META, dict(asin="a4", category=5)]))
    d = prep(tmp_path / "a", "amazon_movies_5")
    assert d.meta["bad_input"] == ["meta_Movies_and_TV.json.gz: kept 4, dropped 0",
                                   "Movies_and_TV_5.json.gz: kept 3, dropped 4 (malformed line: 4)"]
    write(tmp_path / "m" / "raw" / "ratings.dat", b"1::1::5::3\n1::2::3::2\n1::1::4::1\n")
    movies = "1::A (1990)::Drama\n²::B (1991)::Comedy\n2::C::Drama\n"
    write(tmp_path / "m" / "raw" / "movies.dat", movies.encode("latin-1"))
    d = prep(tmp_path / "m", "ml1m")  # '²' passes str.isdigit() but int() refuses it
    assert d.meta["bad_input"][0] == "movies.dat: kept 2, dropped 1 (malformed line: 1)"


def test_strict_unknown_review_names_its_line(tmp_path):
    write(tmp_path / "raw" / "ratings.csv",
          b"userId,movieId,rating,timestamp\n1,1,4.0,1\n1,2,3.0,2\n1,1,2.0,3\n")
    write(tmp_path / "raw" / "movies.csv",
          b"movieId,title,genres\n1,A (1990),Drama\n2,B (1991),Comedy\n")
    write(tmp_path / "raw" / "reviews.csv",
          b"userId,movieId,timestamp,text\n1,1,1,fine\n9,9,9,of no rating\n")
    with pytest.raises(UserError, match=r"reviews\.csv:3: unknown id \(strict mode\)$"):
        prep(tmp_path, "ml20m", strict=True)
    assert prep(tmp_path, "ml20m").review(0) == "fine"


def test_synthetic_deterministic(tmp_path):
    kw = dict(n_users=50, n_items=40, n_genres=5, min_len=5, max_len=10, p_seq=0.4, p_drift=0.05)
    files = lambda p: {f: (p / f).read_bytes()
                       for f in ("ratings.csv", "movies.csv", "reviews.csv")}
    sources.generate_synthetic(tmp_path / "a", seed=1, **kw)
    sources.generate_synthetic(tmp_path / "b", seed=1, **kw)
    sources.generate_synthetic(tmp_path / "c", seed=2, **kw)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert files(tmp_path / "a")["ratings.csv"] != files(tmp_path / "c")["ratings.csv"]


def test_oracle_agrees_with_sampling():
    rng = np.random.default_rng(0)
    world = sources.make_world(60, 6, 0.4, rng)
    pref = sources._preference(np.array([[1, 4, 0]]), np.array([[0.7, 0.3, 0.0]]), 6)  # (1, G)
    for prev in (-1, 17):
        draws = sources.sample_next(world, np.repeat(pref, 200_000, 0), np.full(200_000, prev), rng)
        freq = np.bincount(draws, minlength=60) / len(draws)
        p = sources.next_item_probs(world, pref, np.array([prev]))[0]
        assert abs(p.sum() - 1) < 1e-9 and 0.5 * np.abs(freq - p).sum() < 0.02  # total variation


def test_oracle_on_prepared_data(syn):
    d = syn
    probs, fav = sources.synthetic_oracle(d, "test")
    target = d.feats[0][d.targets("test")]
    top10 = np.argsort(-probs, 1)[:, :10]
    hit = (top10 == target[:, None]).any(1).mean()
    oracle = sources.oracle_recall(d, "test", ks=(10,))["recall@10"]
    assert abs(hit - oracle) < 0.08  # 300 users: std ~ 0.03
    pop = np.bincount(d.feats[0][d.targets("train")], minlength=d.vocab_sizes[0])
    pop[0] = 0
    most_popular = np.isin(target, np.argsort(-pop)[:10]).mean()
    assert oracle > 0.5 > 2 * most_popular
    assert set(fav) <= set(range(1, d.vocab_sizes[1]))
    # the latent genre shows in the history
    assert (d.batch(d.targets("test"), 50)["fav"] == fav).mean() > 0.5


def test_oracle_recall_on_a_subset(syn):
    d = syn
    probs, _ = sources.synthetic_oracle(d, "val")
    every = d.targets("val")
    sub = every[::7]
    top = -np.sort(-probs[::7], 1)  # (B, V) largest first
    got = sources.oracle_recall(d, "val", ks=(1, 5), targets=sub)
    assert got == {"recall@1": float(top[:, 0].mean()), "recall@5": float(top[:, :5].sum(1).mean())}
    assert (sources.oracle_recall(d, "val", ks=(5,), targets=every)
            == sources.oracle_recall(d, "val", ks=(5,)))
    assert 0 < got["recall@1"] < got["recall@5"] < 1
    with pytest.raises(ValueError, match="targets"):
        sources.oracle_recall(d, "val", targets=d.targets("test")[:3])


def test_ml20m_shape_is_read_as_ml20m_and_keeps_every_rating(tmp_path, capsys):
    d = prep(tmp_path, "ml20m-shape", shape_users=60, shape_items=200, shape_events=3000, seed=4)
    assert "ratings.csv: kept 3,000, dropped 0\n" in capsys.readouterr().out  # no duplicate
    lengths = np.diff(d.offsets)
    assert d.n_users == 60 and lengths.sum() == 3000
    assert lengths.min() >= 20 and lengths.max() > 2 * np.median(lengths)  # ML-20M's floor, a tail
    first = np.zeros(3000, bool)
    first[d.offsets[:-1]] = True
    assert (np.diff(np.asarray(d.timestamps))[~first[1:]] > 0).all()  # times rise within a user
    assert d.vocab_sizes[0] - 1 <= 200 and d.rating_values[1:] == [x / 2 for x in range(1, 11)]
