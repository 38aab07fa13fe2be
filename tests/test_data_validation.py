"""Dataset preparation: every bad sample reported before any model loads, with its id and the reason;
good files normalised to one Arrow schema that Axolotl's own loader reads; reuse by source hash."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fixtures_data import DATASET_TYPE, EXAMPLES, conv, images, load_prepared, make_cfg, prepared_examples, write_json  # noqa: F401
from PIL import Image

from axolotl_minicpmv.integration.data import InvalidDatasetError, prepare_dataset_file, prepare_minicpmv_datasets
from axolotl_minicpmv.model.conversation import short_repr


def test_examples_become_uniform_rows_that_axolotl_loads(prepared_examples):
    cfg = prepared_examples
    for ds_cfg, n in ((cfg.datasets[0], 16), (cfg.test_datasets[0], 4)):
        path = Path(ds_cfg.path)
        assert path.suffix == ".parquet" and path.parent.parent == Path(cfg.output_dir).resolve()
        assert ds_cfg.ds_type == "parquet"
        rows = load_prepared(ds_cfg)
        assert len(rows) == n
        assert str(rows.features) == (
            "{'id': Value('string'), 'image': List(Value('string')), 'image_bytes': List(Value('binary')), "
            "'image_sizes': List(List(Value('int64'))), "
            "'conversations': List({'role': Value('string'), 'content': Value('string')})}"
        )  # one schema whatever the rows hold (string / list / no image in the source)
    rows = {r["id"]: r for r in load_prepared(cfg.datasets[0])}
    for row in rows.values():
        assert len(row["image"]) == len(row["image_sizes"])
        for path, size in zip(row["image"], row["image_sizes"]):
            assert Path(path).is_absolute() and Image.open(path).size == tuple(size)
        tags = sum(m["content"].count("<image>") for m in row["conversations"])
        assert tags == len(row["image"])  # after preparation every image has its tag
    # string image with a tag mid-text: unchanged
    assert rows["sample-0002"]["conversations"][0]["content"] == "Look at this: <image>\nWhat colour is the car?"
    # string image without a tag: tag + newline in front of the first user turn (official rule)
    assert rows["sample-0003"]["conversations"][0]["content"] == "<image>\nWhich month had the highest sales in this chart?"
    assert rows["sample-0003"]["image"] == [str(EXAMPLES.resolve() / "images" / "bar_chart.jpg")]
    assert rows["sample-0003"]["image_sizes"] == [[800, 600]]
    # text-only and multi-image rows share the schema
    assert rows["sample-0011"]["image"] == [] and rows["sample-0011"]["image_sizes"] == []
    assert [Path(p).name for p in rows["sample-0012"]["image"]] == ["landscape.jpg", "street.jpg"]


def test_rerun_reuses_the_prepared_file_and_settings_change_it(tmp_path):
    source = write_json(tmp_path / "d.json", [{"id": "t", "conversations": conv("hi", "hello")}])
    first = prepare_dataset_file(source, tmp_path / "out")
    again = prepare_dataset_file(source, tmp_path / "out")
    assert not first.reused and again.reused and again.path == first.path
    assert prepare_dataset_file(source, tmp_path / "out", max_slice_nums=4).path != first.path
    write_json(source, [{"id": "t", "conversations": conv("hi", "hello!")}])
    assert prepare_dataset_file(source, tmp_path / "out").path != first.path


def test_cfg_rewrite_is_idempotent_and_leaves_other_types_alone(tmp_path):
    source = write_json(tmp_path / "d.json", [{"id": "t", "conversations": conv("hi", "hello")}])
    cfg = make_cfg(tmp_path / "run", train=[source], dataset_prepared_path=str(tmp_path / "prep"))
    cfg.datasets.append({"path": "some/alpaca.json", "type": "alpaca"})
    assert len(prepare_minicpmv_datasets(cfg)) == 1
    prepared_path = cfg.datasets[0].path
    assert Path(prepared_path).parent == (tmp_path / "prep" / "minicpmv_data").resolve()  # dataset_prepared_path wins
    assert prepare_minicpmv_datasets(cfg) == []  # second hook call: nothing to do
    assert cfg.datasets[0].path == prepared_path and cfg.datasets[1] == {"path": "some/alpaca.json", "type": "alpaca"}


def test_image_paths_resolve_against_the_json_file_not_the_cwd(tmp_path, images, monkeypatch):
    data_dir = tmp_path / "nested" / "data"
    (data_dir / "pics").mkdir(parents=True)
    (data_dir / "pics" / "a.jpg").write_bytes(images["small"].read_bytes())
    write_json(
        data_dir / "d.json",
        [
            {"id": "rel", "image": "pics/a.jpg", "conversations": conv("<image> what?", "a")},
            {"id": "abs", "image": [str(images["wide"])], "conversations": conv("<image> what?", "b")},
        ],
    )
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(tmp_path / "run", train=["nested/data/d.json"])
    prepare_minicpmv_datasets(cfg)
    rows = {r["id"]: r for r in load_prepared(cfg.datasets[0])}
    assert rows["rel"]["image"] == [str((data_dir / "pics" / "a.jpg").resolve())]
    assert rows["abs"]["image"] == [str(images["wide"].resolve())] and rows["abs"]["image_sizes"] == [[1200, 300]]


def _good(**extra):
    return {"id": "good-0", "conversations": conv("hi", "hello"), **extra}


# (sample, expected reason) -- each bad sample sits at index 1, after a good one
BAD_SAMPLES = {
    "missing image file": ({"id": "bad-1", "image": "nope.jpg", "conversations": conv("<image>q", "a")}, "image 'nope.jpg' not found"),
    "unreadable image": (
        {"id": "bad-1", "image": "broken.jpg", "conversations": conv("q", "a")},
        "image 'broken.jpg' cannot be read as an image",
    ),
    "first turn not user": (
        {"id": "bad-1", "conversations": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
        "the first turn is 'assistant'; it must be 'user'",
    ),
    "unknown role": (
        {"id": "bad-1", "conversations": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]},
        "conversations[1] has unknown role 'system'",
    ),
    "roles not alternating": (
        {"id": "bad-1", "conversations": conv("q", "a")[:1] * 2 + conv("q", "a")[1:]},
        "roles do not alternate: conversations[0] and conversations[1] are both 'user'",
    ),
    "no assistant turn": ({"id": "bad-1", "conversations": conv("just a question")}, "no assistant turn"),
    "empty content": ({"id": "bad-1", "conversations": conv("q", "   ")}, "conversations[1] (assistant) has empty content"),
    "content not a string": (
        {"id": "bad-1", "conversations": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}]},
        "conversations[0] (user): content must be a string",
    ),
    "more tags than images": (
        {"id": "bad-1", "image": "ok.jpg", "conversations": conv("<image> and <image>", "a")},
        "more '<image>' tags (2) than images (1)",
    ),
    "fewer tags than images": (
        {"id": "bad-1", "image": ["ok.jpg", "ok.jpg"], "conversations": conv("<image> only one", "a")},
        "fewer '<image>' tags (1) than images (2)",
    ),
    "list image without its tag": (
        {"id": "bad-1", "image": ["ok.jpg"], "conversations": conv("no tag", "a")},
        "fewer '<image>' tags (0) than images (1)",
    ),
    "tags but no image": ({"id": "bad-1", "conversations": conv("<image> what?", "a")}, "1 '<image>' tag(s) but the sample has no 'image'"),
    "tag in assistant turn": (
        {"id": "bad-1", "image": "ok.jpg", "conversations": conv("q", "see <image>")},
        "conversations[1] (assistant) contains '<image>'",
    ),
    "tag in assistant turn after a system turn": (  # named by the turn's own index, before system turns are folded in
        {"id": "bad-1", "image": "ok.jpg", "conversations": [{"role": "system", "content": "s"}] + conv("q", "see <image>")},
        "conversations[2] (assistant) contains '<image>'",
    ),
    "tag in system turn": (
        {"id": "bad-1", "image": "ok.jpg", "conversations": [{"role": "system", "content": "<image> s"}] + conv("q", "a")},
        "conversations[0] (system) contains '<image>'; images go in user turns",
    ),
    "image name too long for the file system": (
        {"id": "bad-1", "image": "x" * 300 + ".jpg", "conversations": conv("q", "a")},
        f"image {short_repr('x' * 300 + '.jpg')} is neither a usable path nor base64 of an image (",
    ),
    "NUL byte in the image path": (
        {"id": "bad-1", "image": "a\x00b.jpg", "conversations": conv("q", "a")},
        "image 'a\\x00b.jpg' is neither a usable path nor base64 of an image (embedded null byte)",
    ),
    "reserved </image> in text": (
        {"id": "bad-1", "conversations": conv("a </image> b", "a")},
        "conversations[0] (user) contains '</image>', which is reserved",
    ),
    "conversations not a list": (
        {"id": "bad-1", "conversations": "hi"},
        "'conversations' must be a list of {role, content} objects, got a JSON string",
    ),
    "conversations missing": ({"id": "bad-1", "image": "ok.jpg"}, "has no 'conversations'"),
    "message not an object": (
        {"id": "bad-1", "conversations": ["hi", "there"]},
        "conversations[0] must be an object with 'role' and 'content'",
    ),
    "image not a path": (
        {"id": "bad-1", "image": 7, "conversations": conv("q", "a")},
        "'image' must be a path or a list of paths, got a JSON number",
    ),
    "sample not an object": (["not", "a", "sample"], "is a JSON list, expected an object"),
}


@pytest.mark.parametrize("case", BAD_SAMPLES, ids=list(BAD_SAMPLES))
def test_bad_sample_is_reported_with_id_and_reason(tmp_path, images, case):
    sample, reason = BAD_SAMPLES[case]
    (tmp_path / "ok.jpg").write_bytes(images["small"].read_bytes())
    (tmp_path / "broken.jpg").write_bytes(b"this is not a JPEG")
    source = write_json(tmp_path / "train.json", [_good(), sample])
    cfg = make_cfg(tmp_path / "run", train=[source])
    with pytest.raises(InvalidDatasetError) as err:
        prepare_minicpmv_datasets(cfg)
    message = str(err.value)
    where = "sample 'bad-1' (index 1)" if isinstance(sample, dict) else "sample at index 1"
    assert f"{where}: {reason}" in message, message
    assert str(source.resolve()) in message and "1 of 2 samples are invalid" in message
    assert "minicpmv_skip_bad_samples: true" in message
    assert cfg.datasets[0].path == str(source)  # nothing rewritten, nothing half-written
    assert not list((tmp_path / "run").rglob("*.parquet"))


def test_sample_without_id_is_named_by_index(tmp_path):
    source = write_json(tmp_path / "d.json", [_good(), {"conversations": conv("q")}])
    with pytest.raises(InvalidDatasetError, match=r"sample at index 1: no assistant turn"):
        prepare_dataset_file(source, tmp_path / "out")


def test_every_bad_sample_is_listed_at_once(tmp_path):
    samples = [_good(), {"id": "x", "conversations": conv("q")}, _good(id="good-2"), {"id": "y", "conversations": "no"}]
    with pytest.raises(InvalidDatasetError) as err:
        prepare_dataset_file(write_json(tmp_path / "d.json", samples), tmp_path / "out")
    assert "2 of 4 samples are invalid" in str(err.value)
    assert "sample 'x' (index 1): no assistant turn" in str(err.value)
    assert "sample 'y' (index 3): 'conversations' must be a list" in str(err.value)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"id": "a", "conversations": []}', "expected a JSON list of samples"),
        ('"just a string"', "found a JSON string"),
        ("[{", "not valid JSON"),
        ("[]", "the dataset has no samples"),
    ],
)
def test_file_that_is_not_a_json_list_is_named(tmp_path, content, message):
    source = tmp_path / "weird.json"
    source.write_text(content)
    with pytest.raises(InvalidDatasetError, match=message) as err:
        prepare_minicpmv_datasets(make_cfg(tmp_path / "run", train=[source]))
    assert str(err.value).startswith(f"{source.resolve()}: ")


def test_missing_dataset_file_is_named(tmp_path):
    with pytest.raises(InvalidDatasetError, match=r"nope\.json: dataset file not found"):
        prepare_minicpmv_datasets(make_cfg(tmp_path / "run", train=[tmp_path / "nope.json"]))


def test_test_datasets_are_validated_too(tmp_path):
    train = write_json(tmp_path / "train.json", [_good()])
    test = write_json(tmp_path / "test.json", [{"id": "e-1", "conversations": conv("q", "")}])
    with pytest.raises(InvalidDatasetError, match=r"test\.json: 1 of 1 samples are invalid:\n  - sample 'e-1' \(index 0\)"):
        prepare_minicpmv_datasets(make_cfg(tmp_path / "run", train=[train], test=[test]))


def test_skip_mode_logs_each_bad_sample_and_the_total(tmp_path, images, caplog):
    samples = [
        {"id": "keep", "image": str(images["small"]), "conversations": conv("q", "a")},
        {"id": "gone-1", "image": "missing.jpg", "conversations": conv("q", "a")},
        {"id": "gone-2", "conversations": conv("q", "a", "q2", "a2")[::-1]},
    ]
    source = write_json(tmp_path / "d.json", samples)
    cfg = make_cfg(tmp_path / "run", train=[source], minicpmv_skip_bad_samples=True)
    with caplog.at_level(logging.WARNING):
        (result,) = prepare_minicpmv_datasets(cfg)
    assert (result.num_samples, result.num_skipped) == (1, 2)
    assert [r["id"] for r in load_prepared(cfg.datasets[0])] == ["keep"]
    log = caplog.text
    assert "skipping sample 'gone-1' (index 1): image 'missing.jpg' not found" in log
    assert "skipping sample 'gone-2' (index 2): the first turn is 'assistant'" in log
    assert "skipped 2 of 3 samples" in log
    meta = json.loads(result.path.with_suffix(".json").read_text())
    assert [s["sample"] for s in meta["skipped"]] == ["sample 'gone-1' (index 1)", "sample 'gone-2' (index 2)"]
    # the strict setting does not reuse the skipping run's file: it reports the bad samples
    with pytest.raises(InvalidDatasetError, match="gone-1"):
        prepare_minicpmv_datasets(make_cfg(tmp_path / "run", train=[source]))


def test_skip_mode_with_nothing_left_is_an_error(tmp_path):
    source = write_json(tmp_path / "d.json", [{"id": "x", "conversations": conv("q")}])
    with pytest.raises(InvalidDatasetError, match=r"no usable samples left \(1 bad of 1\)"):
        prepare_minicpmv_datasets(make_cfg(tmp_path / "run", train=[source], minicpmv_skip_bad_samples=True))


def test_jsonl_source_is_accepted(tmp_path):
    source = tmp_path / "d.jsonl"
    source.write_text("\n".join(json.dumps({"id": f"s{i}", "conversations": conv("q", "a")}) for i in range(3)) + "\n")
    assert prepare_dataset_file(source, tmp_path / "out").num_samples == 3


@pytest.mark.parametrize("value", [0, -1, "9", True])
def test_max_slice_nums_must_be_a_positive_int(tmp_path, value):
    with pytest.raises(ValueError, match="minicpmv_max_slice_nums must be a positive integer"):
        prepare_minicpmv_datasets(make_cfg(tmp_path, minicpmv_max_slice_nums=value))
