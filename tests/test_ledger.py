"""The per-image ledger: add/add_many, growth, completeness checks, merging shards, CSV round trip."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest

from cortexbench.errors import WorkerError
from cortexbench.ledger import COLUMNS, OUTCOMES, STAGE_COLUMNS, Ledger

MODELS = ("resnet", "vgg16", "null")
WORKERS = ("gpu:0", "gpu:1", "cpu:0")


def _rows(n: int, seed: int = 0, items: np.ndarray | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sched = np.sort(rng.random(n) * 10)
    sent = sched + rng.random(n) * 0.01
    done = sent + rng.random(n) * 0.1
    out = {
        "item": np.arange(n, dtype=np.int64) if items is None else items,
        "model_idx": rng.integers(0, len(MODELS), n),
        "image_idx": rng.integers(0, 1000, n),
        "worker": rng.integers(0, len(WORKERS), n),
        "outcome": np.where(rng.random(n) < 0.8, 0, rng.integers(1, len(OUTCOMES), n)),
        "attempts": rng.integers(1, 4, n),
        "hit": rng.integers(-1, 2, n),
        "scheduled_s": sched, "sent_s": sent, "done_s": done,
    }
    for c in STAGE_COLUMNS:
        v = rng.random(n) * 0.01
        v[rng.random(n) < 0.2] = np.nan
        out[c] = v
    return out


def _add_one_by_one(led: Ledger, rows: dict[str, np.ndarray]) -> None:
    for k in range(len(rows["item"])):
        h = int(rows["hit"][k])
        led.add(int(rows["item"][k]), int(rows["model_idx"][k]), int(rows["image_idx"][k]), int(rows["worker"][k]),
                int(rows["outcome"][k]), attempts=int(rows["attempts"][k]), hit=None if h < 0 else bool(h),
                scheduled_s=float(rows["scheduled_s"][k]), sent_s=float(rows["sent_s"][k]),
                done_s=float(rows["done_s"][k]), **{c: float(rows[c][k]) for c in STAGE_COLUMNS})


def _same(a: Ledger, b: Ledger) -> None:
    assert len(a) == len(b)
    for name in COLUMNS:
        np.testing.assert_array_equal(a.column(name), b.column(name), err_msg=name)


def test_add_and_add_many_agree_and_grow_past_capacity():
    rows = _rows(1000)
    one = Ledger(MODELS, WORKERS, capacity=8)
    _add_one_by_one(one, rows)
    many = Ledger(MODELS, WORKERS, capacity=8)
    for start in range(0, 1000, 37):  # uneven groups, as workers return them
        many.add_many(**{k: v[start:start + 37] for k, v in rows.items()})
    assert len(one) == len(many) == 1000
    assert one.capacity >= 1000 and one.capacity == 1024  # doubled from 8
    _same(one, many)
    assert np.allclose(many.column("latency_s"), rows["done_s"] - rows["scheduled_s"])
    np.testing.assert_array_equal(many.column("item"), rows["item"])
    assert many.column("queue_s").dtype == np.float32


def test_add_many_takes_stages_as_one_array_and_slice():
    rows = _rows(50, seed=5)
    by_name = Ledger(MODELS, WORKERS)
    by_name.add_many(**rows)
    packed = {k: v for k, v in rows.items() if k not in STAGE_COLUMNS}
    by_array = Ledger(MODELS, WORKERS)
    by_array.add_many(**packed, stages=np.stack([rows[c] for c in STAGE_COLUMNS], axis=1))
    _same(by_name, by_array)
    with pytest.raises(ValueError, match="shape"):
        by_array.add_many(**packed, stages=np.zeros((50, 2)))
    part = by_array.slice(10, 30)
    assert len(part) == 20 and part.column("item").tolist() == list(range(10, 30))
    assert part.models == MODELS and part.workers == WORKERS
    assert len(by_array.slice(45, 100)) == 5 and len(by_array.slice(50)) == 0


def test_add_many_broadcasts_scalars_and_names():
    led = Ledger(MODELS, WORKERS)
    led.add_many(np.array([5, 6, 7]), 1, np.array([0, 1, 2]), 2, "timeout", scheduled_s=np.zeros(3),
                 sent_s=0.0, done_s=np.array([1.0, 2.0, 3.0]))
    assert led.column("model_idx").tolist() == [1, 1, 1]
    assert led.outcome_counts()["timeout"] == 3
    assert led.column("hit").tolist() == [-1, -1, -1]
    assert np.isnan(led.column("infer_s")).all()
    assert led.column("latency_s").tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="3 rows"):
        led.add_many(np.array([8, 9, 10]), np.array([0, 1]), 0, 0, 0, scheduled_s=0.0, sent_s=0.0, done_s=0.0)
    assert len(led) == 3
    led.add_many(np.array([], dtype=np.int64), 0, 0, 0, 0, scheduled_s=0.0, sent_s=0.0, done_s=0.0)
    assert len(led) == 3


def test_counts_and_ok_mask():
    rows = _rows(500, seed=1)
    led = Ledger(MODELS, WORKERS)
    led.add_many(**rows)
    counts = led.outcome_counts()
    assert list(counts) == list(OUTCOMES)
    assert sum(counts.values()) == 500
    assert counts["ok"] == int(np.sum(rows["outcome"] == 0)) == int(led.ok_mask().sum())


def test_check_complete_catches_lost_and_duplicated_images():
    led = Ledger(MODELS, WORKERS)
    led.add_many(**_rows(100))
    led.check_complete(100)
    with pytest.raises(WorkerError, match="100 images, but 101 were sent: 1 unaccounted"):
        led.check_complete(101)
    with pytest.raises(WorkerError, match="100 images, but 99 were sent: 1 recorded but never sent"):
        led.check_complete(99)
    dup = Ledger(MODELS, WORKERS)
    dup.add_many(**_rows(100, items=np.r_[np.arange(99), 42]))
    with pytest.raises(WorkerError, match=r"1 images recorded twice \(items 42\)"):
        dup.check_complete(100)


def test_merge_of_shards_equals_one_ledger():
    rows = _rows(900, seed=2)
    whole = Ledger(MODELS, WORKERS)
    whole.add_many(**rows)
    shards = []
    for i in range(3):  # shards record items i, i+3, ... in a different order, each with its own worker list
        sl = np.arange(i, 900, 3)[::-1]
        workers = WORKERS[::-1] if i == 1 else WORKERS
        part = {k: v[sl] for k, v in rows.items()}
        if i == 1:
            part["worker"] = len(WORKERS) - 1 - part["worker"]
        led = Ledger(MODELS, workers)
        led.add_many(**part)
        shards.append(led)
    merged = Ledger.merge(shards)
    assert merged.models == MODELS
    names = np.array(merged.workers)[merged.column("worker")]
    np.testing.assert_array_equal(names, np.array(WORKERS)[rows["worker"]])
    for name in COLUMNS:
        if name != "worker":
            np.testing.assert_array_equal(merged.column(name), whole.column(name), err_msg=name)
    merged.check_complete(900)
    with pytest.raises(WorkerError, match="more than one shard"):
        Ledger.merge([shards[0], shards[0]])


def test_excluding_warmup_and_pickle():
    led = Ledger(MODELS, WORKERS, capacity=4096)
    led.add_many(**_rows(300, seed=3))
    counted = led.excluding_warmup(50)
    assert len(counted) == 250 and counted.column("item").min() == 50
    back = pickle.loads(pickle.dumps(led))
    _same(led, back)
    assert back.models == MODELS and back.workers == WORKERS
    assert len(pickle.dumps(led)) < 300 * 120  # filled rows only, not the 4096 preallocated
    back.add(1000, 0, 0, 0, "ok", scheduled_s=0.0, sent_s=0.0, done_s=1.0)  # still growable
    assert len(back) == 301


def test_csv_round_trip(tmp_path):
    led = Ledger(MODELS, WORKERS)
    led.add_many(**_rows(400, seed=4))
    path = led.save_csv_gz(tmp_path / "records.csv.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["records.csv.gz"]  # no temporary file left
    with gzip.open(path, "rt") as f:
        header = f.readline().strip().split(",")
        first = f.readline().strip().split(",")
    assert header == Ledger.header() and "latency_s" in header and "model" in header
    assert first[1] in MODELS and first[3] in WORKERS and first[4] in OUTCOMES
    back = Ledger.from_csv_gz(path, models=MODELS, workers=WORKERS)
    assert back.models == MODELS and back.workers == WORKERS
    for name in ("item", "model_idx", "image_idx", "worker", "outcome", "attempts", "hit"):
        np.testing.assert_array_equal(back.column(name), led.column(name), err_msg=name)
    for name in ("scheduled_s", "sent_s", "done_s", "latency_s", *STAGE_COLUMNS):
        a, b = back.column(name), led.column(name)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        assert np.allclose(a[~np.isnan(a)], b[~np.isnan(b)], atol=1e-7), name
    # without names given, they are numbered in order of appearance but map back to the same rows
    plain = Ledger.from_csv_gz(path)
    np.testing.assert_array_equal(np.array(plain.models)[plain.column("model_idx")],
                                  np.array(MODELS)[led.column("model_idx")])


def test_csv_of_empty_ledger(tmp_path):
    path = Ledger(MODELS, WORKERS).save_csv_gz(tmp_path / "empty.csv.gz")
    back = Ledger.from_csv_gz(path, models=MODELS, workers=WORKERS)
    assert len(back) == 0
    back.check_complete(0)


def test_merge_maps_each_shards_model_names_and_finds_a_duplicate_anywhere():
    a = Ledger(("x", "y"), ("w0",))
    a.add_many(item=np.array([0, 2]), model_idx=np.array([0, 1]), image_idx=0, worker=0, outcome=0,
               scheduled_s=0.0, sent_s=0.0, done_s=1.0)
    b = Ledger(("y", "z"), ("w1",))  # another shard's own model order
    b.add_many(item=np.array([1, 3]), model_idx=np.array([0, 1]), image_idx=0, worker=0, outcome=0,
               scheduled_s=0.0, sent_s=0.0, done_s=1.0)
    merged = Ledger.merge([a, b])
    assert merged.models == ("x", "y", "z") and merged.workers == ("w0", "w1")
    names = np.array(merged.models)[merged.column("model_idx")]
    assert names.tolist() == ["x", "y", "y", "z"] and merged.column("worker").tolist() == [0, 1, 0, 1]
    c = Ledger(("x",), ("w2",))
    c.add_many(item=np.array([5, 3, 2]), model_idx=0, image_idx=0, worker=0, outcome=0, scheduled_s=0.0,
               sent_s=0.0, done_s=1.0)
    with pytest.raises(WorkerError, match=r"2 items appear in more than one shard \(first: 2\)"):
        Ledger.merge([a, b, c])
    with pytest.raises(ValueError, match="needs at least one ledger"):
        Ledger.merge([])


def test_an_empty_ledger_pickles_and_grows_afterwards():
    back = pickle.loads(pickle.dumps(Ledger(MODELS, WORKERS)))
    assert len(back) == 0 and back.models == MODELS
    rows = _rows(50, seed=6)
    back.add_many(**rows)
    whole = Ledger(MODELS, WORKERS)
    whole.add_many(**rows)
    _same(back, whole)


def test_csv_rows_write_unknown_values_as_empty_strings():
    led = Ledger(MODELS, WORKERS)
    led.add_many(item=np.arange(4), model_idx=np.array([0, 2, 3, -2]), image_idx=0,
                 worker=np.array([1, -1, 3, 0]), outcome=0, hit=np.array([1, 0, -1, -1]), scheduled_s=0.0,
                 sent_s=0.0, done_s=0.5, infer_s=np.array([0.25, np.nan, 0.125, np.nan]))
    rows = list(led.to_rows())
    col = {name: [r[i] for r in rows] for i, name in enumerate(Ledger.header())}
    assert col["model"] == ["resnet", "null", "", ""]  # out of range either way: unknown
    assert col["worker"] == ["gpu:1", "", "", "gpu:0"]
    assert col["hit"] == [1, 0, "", ""]
    assert col["infer_s"] == [0.25, "", 0.125, ""] and col["queue_s"] == ["", "", "", ""]
    assert col["latency_s"] == [0.5] * 4


def test_reading_a_file_that_is_not_a_ledger_says_so(tmp_path):
    path = tmp_path / "other.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a cortexbench ledger \\(expected header item,model,"):
        Ledger.from_csv_gz(path)
    empty = tmp_path / "empty.csv.gz"
    with gzip.open(empty, "wt") as f:
        f.write("")
    with pytest.raises(ValueError, match="not a cortexbench ledger"):
        Ledger.from_csv_gz(empty)


def test_check_complete_refuses_unknown_outcomes_and_names_the_counts():
    rows = _rows(10)
    rows["outcome"] = np.array([0] * 8 + [len(OUTCOMES), 0])
    bad = Ledger(MODELS, WORKERS)
    bad.add_many(**rows)
    with pytest.raises(WorkerError, match=r"^ledger: 1 images have an unknown outcome code \(valid: 0\.\.6\)$"):
        bad.check_complete(10)
    rows["outcome"] = np.array([0] * 7 + [2, 3, 5])
    led = Ledger(MODELS, WORKERS)
    led.add_many(**rows)
    with pytest.raises(WorkerError, match=r"^ledger: 7 ok \+ 3 failed = 10 images, but 12 were sent: "
                                          r"2 unaccounted for \(lost\)$"):
        led.check_complete(12)
    dup = Ledger(MODELS, WORKERS)
    dup.add_many(**_rows(12, items=np.array([5, 4, 3, 2, 1, 0] * 2)))
    with pytest.raises(WorkerError, match=r"^ledger: 6 images recorded twice \(items 0, 1, 2, 3, 4\); "
                                          r"a result was counted more than once$"):
        dup.check_complete(12)


def test_defaults_a_scalar_row_and_an_unknown_column():
    led = Ledger(MODELS, WORKERS)
    led.add(0, 0, 0, 0, "ok", scheduled_s=0.0, sent_s=0.0, done_s=1.0)
    led.add_many(item=1, model_idx=0, image_idx=0, worker=0, outcome=0, scheduled_s=0.0, sent_s=0.0, done_s=1.0)
    assert len(led) == 2 and led.column("attempts").tolist() == [1, 1] and led.column("hit").tolist() == [-1, -1]
    with pytest.raises(KeyError, match=r"no ledger column 'nope' \(columns: item, model_idx, "):
        led.column("nope")


def test_answer_columns_are_kept_written_and_read_back(tmp_path):
    """What a worker ran and answered (input_idx, top1, checksum): by add and add_many, to CSV and back;
    unknown values (-1, NaN) are written as '' and read back as unknown, 0 is a real value."""
    led = Ledger(MODELS, WORKERS)
    led.add(0, 0, 0, 0, "ok", scheduled_s=0.0, sent_s=0.0, done_s=1.0, input_idx=0, top1=0, checksum=0.0, infer_s=0.5)
    led.add(1, 0, 0, 0, "ok", scheduled_s=0.0, sent_s=0.0, done_s=1.0, input_idx=7, top1=3, checksum=-2.5)
    led.add_many(item=np.array([2, 3]), model_idx=0, image_idx=0, worker=0, outcome=0, scheduled_s=0.0, sent_s=0.0,
                 done_s=1.0, answers=np.array([[5, 1, 1.25], [-1, -1, np.nan]]))
    led.add_many(item=np.array([4]), model_idx=0, image_idx=0, worker=0, outcome=0, scheduled_s=0.0, sent_s=0.0,
                 done_s=1.0)
    want = {"input_idx": [0, 7, 5, -1, -1], "top1": [0, 3, 1, -1, -1]}
    for name, values in want.items():
        assert led.column(name).tolist() == values
    np.testing.assert_array_equal(led.column("checksum"), [0.0, -2.5, 1.25, np.nan, np.nan])
    assert led.column("infer_s")[0] == 0.5 and np.isnan(led.column("infer_s")[1:]).all()
    rows = list(led.to_rows())
    col = {name: [r[i] for r in rows] for i, name in enumerate(Ledger.header())}
    assert col["input_idx"] == [0, 7, 5, "", ""] and col["top1"] == [0, 3, 1, "", ""]
    assert col["checksum"] == [0.0, -2.5, 1.25, "", ""]
    back = Ledger.from_csv_gz(led.save_csv_gz(tmp_path / "l.csv.gz"))
    for name, values in want.items():
        assert back.column(name).tolist() == values
    np.testing.assert_array_equal(back.column("checksum"), led.column("checksum"))
    with pytest.raises(TypeError, match=r"^Ledger: unknown stage column 'load_s' \(valid: queue_s, input_s, "):
        led.add(5, 0, 0, 0, "ok", scheduled_s=0.0, sent_s=0.0, done_s=1.0, load_s=1.0, infer_s=1.0)
    with pytest.raises(TypeError, match=r"^Ledger: unknown stage column 'x_s' \(valid: .*, free_s\)$"):
        led.add_many(item=np.array([5]), model_idx=0, image_idx=0, worker=0, outcome=0, scheduled_s=0.0,
                     sent_s=0.0, done_s=1.0, infer_s=1.0, x_s=1.0)
    assert len(led) == 5


def test_codes_out_of_range_are_written_as_unknown_and_merge_needs_a_ledger():
    led = Ledger(MODELS, WORKERS)
    led.add_many(item=np.arange(2), model_idx=np.array([len(MODELS), len(MODELS) + 1]), image_idx=0,
                 worker=np.array([len(WORKERS), len(WORKERS) + 1]), outcome=np.array([len(OUTCOMES), 0]),
                 scheduled_s=0.0, sent_s=0.0, done_s=0.5)
    rows = list(led.to_rows())
    col = {name: [r[i] for r in rows] for i, name in enumerate(Ledger.header())}
    assert col["model"] == ["", ""] and col["worker"] == ["", ""] and col["outcome"] == ["", "ok"]
    with pytest.raises(ValueError, match=r"^Ledger.merge needs at least one ledger$"):
        Ledger.merge([])
